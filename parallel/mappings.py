"""Autograd-aware movements of activations across the tensor-parallel group.

Each function is a pair (forward collective, backward collective) that are adjoint to each
other, so gradients come out exactly as the serial model's would. Tensors are laid out
[sequence, batch, hidden]; sequence parallelism splits dimension 0, tensor parallelism the last.
"""
from __future__ import annotations

import torch

from parallel import comm

SEQ_DIM = 0


class _CopyToGroup(torch.autograd.Function):
    """Forward identity; backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        comm.all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward sums over the group; backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        comm.all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split_dim(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_dim(grad, ctx.group, -1), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_dim(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return comm.split_dim(grad, ctx.group, -1), None


class _ScatterSeq(torch.autograd.Function):
    """Keep this rank's sequence slice; backward all-gathers the slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_dim(grad, ctx.group, SEQ_DIM), None


class _GatherSeq(torch.autograd.Function):
    """All-gather sequence slices; backward reduce-scatters (the consumer is TP-split)."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return comm.all_gather_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return comm.reduce_scatter_dim(grad, ctx.group, SEQ_DIM), None, None
        return comm.split_dim(grad, ctx.group, SEQ_DIM), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sum partial outputs over the group and keep this rank's sequence slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_dim(grad, ctx.group, SEQ_DIM), None


def copy_to_tp(x, group):
    return _CopyToGroup.apply(x, group) if comm.group_size(group) > 1 else x


def reduce_from_tp(x, group):
    return _ReduceFromGroup.apply(x, group) if comm.group_size(group) > 1 else x


def scatter_to_tp(x, group):
    return _ScatterLastDim.apply(x, group) if comm.group_size(group) > 1 else x


def gather_from_tp(x, group):
    return _GatherLastDim.apply(x, group) if comm.group_size(group) > 1 else x


def scatter_to_sp(x, group):
    return _ScatterSeq.apply(x, group) if comm.group_size(group) > 1 else x


def gather_from_sp(x, group, reduce_grad: bool = True):
    return _GatherSeq.apply(x, group, reduce_grad) if comm.group_size(group) > 1 else x


def reduce_scatter_to_sp(x, group):
    return _ReduceScatterSeq.apply(x, group) if comm.group_size(group) > 1 else x

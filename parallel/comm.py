"""Collective wrappers that work on torch 2.11 and 2.13, gloo and NCCL.

torch 2.13 renames the tensor-in/tensor-out collectives (`*_single`) and deprecates the old
names, which 2.11 still uses; these pick whichever the running torch offers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    if group_size(group) == 1:
        return None
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_gather_dim(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim` (equal shapes on every rank)."""
    size = group_size(group)
    if size == 1:
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0],) + tuple(moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out, moved, group=group)
    return out.movedim(0, dim)


def reduce_scatter_dim(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, then keep this rank's equal slice along `dim`."""
    size = group_size(group)
    if size == 1:
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    if moved.shape[0] % size:
        raise ValueError(f"dimension {dim} of size {moved.shape[0]} does not split over {size} ranks")
    out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _reduce_scatter_flat(out, moved, group=group)
    return out.movedim(0, dim)


def all_gather_flat(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    return _all_gather_flat(output, shard, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, full: torch.Tensor, group, async_op: bool = False):
    return _reduce_scatter_flat(output, full, group=group, async_op=async_op)


def split_dim(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's equal slice of `tensor` along `dim`."""
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} does not split over {size} ranks")
    rank = dist.get_rank(group)
    return tensor.chunk(size, dim=dim)[rank].contiguous()

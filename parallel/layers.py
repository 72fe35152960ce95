"""Tensor-parallel building blocks: column/row-parallel linears and the vocab-parallel embedding.

Parameters are allocated at their local (sharded) shape and carry a ShardSpec; the model fills
them with `sharding.init_from_full`, so every layout starts from the same full weights.
The matmul itself goes through `self.linear_fn`, which wrappers (LoRA, NF4, FP8) may replace
without the model code changing.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import comm, main_grad_embedding, main_grad_linear
from parallel.mappings import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from parallel.sharding import ShardSpec, attach, check_divisible


def _param(shape, spec: ShardSpec, device, dtype) -> nn.Parameter:
    return attach(nn.Parameter(torch.empty(shape, device=device, dtype=dtype)), spec)


def mark_sequence_parallel(param: nn.Parameter) -> None:
    """A replicated parameter that sees only a sequence slice: its grad is summed over TP."""
    param.sequence_parallel = True


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows. `out_parts` lists fused blocks (e.g. gate and
    up) that are each split across ranks, so a rank holds matching slices of every block."""

    def __init__(self, in_features, out_parts, tp_group, bias=False, gather_output=False,
                 sequence_parallel=False, device=None, dtype=None):
        super().__init__()
        out_parts = tuple(out_parts) if isinstance(out_parts, (list, tuple)) else (out_parts,)
        self.tp_group, self.tp = tp_group, comm.group_size(tp_group)
        check_divisible(out_parts, self.tp, "column-parallel output")
        rank = torch.distributed.get_rank(tp_group) if self.tp > 1 else 0
        self.in_features, self.out_features = in_features, sum(out_parts)
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        spec = ShardSpec((self.out_features, in_features), 0, out_parts, rank, self.tp)
        self.weight = _param(spec.local_shape(), spec, device, dtype)
        self.bias = None
        if bias:
            bias_spec = ShardSpec((self.out_features,), 0, out_parts, rank, self.tp)
            self.bias = _param(bias_spec.local_shape(), bias_spec, device, dtype)
        self.linear_fn = main_grad_linear.linear

    def forward(self, x):
        if self.sequence_parallel:
            x = gather_from_sp(x, self.tp_group)
        else:
            x = copy_to_tp(x, self.tp_group)
        y = self.linear_fn(x, self.weight, self.bias)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial products summed over TP (or
    reduce-scattered along the sequence under sequence parallelism). The bias is added once,
    after the reduction."""

    def __init__(self, in_features, out_features, tp_group, bias=False, sequence_parallel=False,
                 device=None, dtype=None):
        super().__init__()
        self.tp_group, self.tp = tp_group, comm.group_size(tp_group)
        check_divisible((in_features,), self.tp, "row-parallel input")
        rank = torch.distributed.get_rank(tp_group) if self.tp > 1 else 0
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        spec = ShardSpec((out_features, in_features), 1, (), rank, self.tp)
        self.weight = _param(spec.local_shape(), spec, device, dtype)
        self.bias = None
        if bias:
            self.bias = _param((out_features,), ShardSpec((out_features,)), device, dtype)
            if sequence_parallel:
                mark_sequence_parallel(self.bias)
        self.linear_fn = main_grad_linear.linear

    def forward(self, x, residual=None):
        """residual (optional, the output's shape): added to the output, as a pre-norm layer's
        residual stream is. On one TP rank with the default matmul and no bias there is no
        reduction between the GEMM and the add, so the GEMM may read it in its epilogue."""
        if residual is not None and self.tp == 1 and self.bias is None and self.linear_fn is main_grad_linear.linear:
            return main_grad_linear.linear(x, self.weight, None, residual)
        y = self.linear_fn(x, self.weight, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.tp_group)
        else:
            y = reduce_from_tp(y, self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else residual + y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns and the
    partial results are summed (or reduce-scattered along the sequence)."""

    def __init__(self, num_embeddings, dim, tp_group, sequence_parallel=False, sole_use=True, device=None,
                 dtype=None):
        """sole_use: the weight gets no other gradient (not tied to an output layer on this stage),
        so the lookup's backward may add its gradient straight into main_grad."""
        super().__init__()
        self.tp_group, self.tp = tp_group, comm.group_size(tp_group)
        check_divisible((num_embeddings,), self.tp, "vocabulary")
        rank = torch.distributed.get_rank(tp_group) if self.tp > 1 else 0
        self.per_rank = num_embeddings // self.tp
        self.vocab_start = rank * self.per_rank
        self.sequence_parallel, self.sole_use = sequence_parallel, sole_use
        spec = ShardSpec((num_embeddings, dim), 0, (), rank, self.tp)
        self.weight = _param(spec.local_shape(), spec, device, dtype)

    def forward(self, ids):
        """ids: [s, b] -> [s, b, dim] (or [s/tp, b, dim] under sequence parallelism)."""
        if self.tp == 1:
            out = main_grad_embedding.embedding(ids, self.weight, self.sole_use)
        else:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.per_rank)
            out = main_grad_embedding.embedding(local.masked_fill(outside, 0), self.weight, self.sole_use, outside)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)

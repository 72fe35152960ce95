"""Gradient reductions that make a parallel step equal the serial one: sequence-parallel
parameter grads summed over TP, data-parallel grads summed over DP, and the global norm with
every parameter counted exactly once."""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel import comm

DEFAULT_BUCKET_NUMEL = 32 * 1024 * 1024


def _buckets(tensors, bucket_numel):
    """Group tensors of one dtype into lists of at most `bucket_numel` elements."""
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        bucket, size = [], 0
        for tensor in group:
            if bucket and size + tensor.numel() > bucket_numel:
                yield bucket
                bucket, size = [], 0
            bucket.append(tensor)
            size += tensor.numel()
        if bucket:
            yield bucket


def all_reduce_coalesced(tensors, group, bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """Sum tensors over `group` in flat buckets (few large collectives, not many small)."""
    if comm.group_size(group) == 1:
        return
    for bucket in _buckets(list(tensors), bucket_numel):
        flat = _flatten_dense_tensors(bucket)
        comm.all_reduce(flat, group)
        for tensor, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(synced)


def holds_partial_tp_grad(param) -> bool:
    """A TP-replicated parameter whose per-rank gradient is only a part of the full one:
    applied to a sequence slice (`sequence_parallel`), or feeding a TP-split tensor (a LoRA
    adapter next to a split base weight, `tp_partial_grad`)."""
    return getattr(param, "sequence_parallel", False) or getattr(param, "tp_partial_grad", False)


def reduce_sequence_parallel_grads(params, tp_group) -> None:
    """Replicated parameters with partial grads (holds_partial_tp_grad): sum their fp32
    main_grad over TP. Sums commute, so this may run before or after the DP reduction."""
    all_reduce_coalesced([p.main_grad for p in params if holds_partial_tp_grad(p)], tp_group)


def is_counted_on_this_rank(param, tp_rank: int) -> bool:
    """TP-split parameters count on every rank; TP-replicated ones only on TP rank 0; the last
    pipeline stage's copy of a tied embedding never (the first stage counts it)."""
    if getattr(param, "tied_embedding_copy", False):
        return False
    spec = getattr(param, "shard_spec", None)
    return tp_rank == 0 or (spec is not None and spec.is_split)


def global_grad_norm(grads, reduce_groups, device) -> torch.Tensor:
    """L2 norm (fp32) over `grads` of every rank in `reduce_groups`, identical on all of them.
    The caller passes each gradient element once across those groups: TP-replicated
    parameters only from TP rank 0, and under DP sharding only this rank's shard."""
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        # One multi-tensor kernel for all per-tensor norms instead of three kernels a tensor.
        norms = torch._foreach_norm([g.detach().float() for g in grads])
        squares = torch.stack(norms).pow(2).sum()
    for group in reduce_groups:
        comm.all_reduce(squares, group)
    return squares.sqrt()


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor | None:
    """The factor that brings the global norm down to max_norm (as torch's clip_grad_norm_),
    or None when no clipping is needed (one host sync; the log reads the norm anyway)."""
    if max_norm <= 0:
        return None
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    return coef if bool(coef < 1.0) else None

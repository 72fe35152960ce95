"""Tied input/output embeddings across pipeline stages.

With pp > 1 the first stage holds the input embedding and the last stage its own copy as the
output layer (both initialised to the same values). Summing their gradients after backward,
over a group of just those two ranks per pipeline (Megatron's embedding group), gives both
copies the serial model's gradient, so identical optimizer updates keep them equal.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm


def build_embedding_group(pipelines: list, my_rank: int, timeout=None):
    """The group of the first and last rank of this rank's pipeline (None if not in one).
    `pipelines`: every pipeline's global ranks in stage order, the same list on every rank,
    because new_group is collective and must be called in the same order everywhere."""
    mine = None
    for ranks in pipelines:
        group = dist.new_group([ranks[0], ranks[-1]], timeout=timeout)
        if my_rank in (ranks[0], ranks[-1]):
            mine = group
    return mine


def all_reduce_tied_embedding_grads(params, group) -> None:
    """Sum the (local, not yet data-parallel reduced) gradients of the tied-embedding copies
    on this rank over the embedding group: `main_grad` where a gradient buffer holds them."""
    if group is None:
        return
    for param in params:
        if hasattr(param, "main_grad"):
            comm.all_reduce(param.main_grad, group)
            continue
        if param.grad is None:  # keep the collective matched even if a copy got no gradient
            param.grad = torch.zeros_like(param)
        comm.all_reduce(param.grad, group)

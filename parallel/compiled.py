"""torch.compile for the small fused functions of models/ and parallel/ (elementwise and
row-reduction code that inductor turns into one kernel each)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def for_device(fn, tensor: torch.Tensor):
    """fn compiled (static shapes, compiled once per function) for a CUDA tensor; fn itself on
    CPU, where the tests run the same code eagerly."""
    return _compiled(fn) if tensor.is_cuda else fn

"""The installed flash-attention package, behind one calling convention.

Two packages put their kernels under the `flash_attn` name:
- FlashAttention-2 (`flash_attn.flash_attn_func`): Ampere and later, with dropout;
- FlashAttention-4's CuTe kernels (`flash_attn.cute`, the `flash-attn-4` wheel): Ampere to
  Blackwell kernels compiled just in time, no dropout; both functions return (out, lse).
Both take [b, s, n, d] tensors whose last dimension is contiguous (other strides are free, so
the [s, b, n, d] q, k, v go in without a copy) and k, v with fewer heads for GQA; the output
comes back [b, s, n, d]-contiguous, which the [s, b, h] activations then copy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class FlashKernels:
    name: str
    dense: Callable  # (q, k, v, dropout) -> out, causal
    varlen: Callable  # (q, k, v, cu_seqlens, max_len, dropout) -> out, causal within each sequence
    dropout: bool  # whether the kernels apply attention dropout
    min_capability: tuple
    auto: bool  # whether model.attention_backend auto picks these kernels over SDPA

    def unusable_reason(self, q, dropout: float) -> Optional[str]:
        """Why these kernels cannot run this call, or None when they can."""
        if dropout > 0 and not self.dropout:
            return f"{self.name} has no attention dropout (model.attention_dropout is {dropout})"
        if not q.is_cuda:
            return "flash attention runs on CUDA tensors only"
        if q.dtype not in (torch.bfloat16, torch.float16):
            return f"flash attention takes bf16 or fp16, not {q.dtype}"
        if torch.cuda.get_device_capability(q.device) < self.min_capability:
            return f"{self.name} needs compute capability {self.min_capability} or newer"
        if q.shape[-1] % 8 or q.shape[-1] > 256:
            return f"{self.name} takes head dims that are multiples of 8 up to 256, not {q.shape[-1]}"
        return None


def _flash2(fa) -> FlashKernels:
    def dense(q, k, v, dropout):
        return fa.flash_attn_func(q, k, v, dropout_p=dropout, causal=True)

    def varlen(q, k, v, cu, max_len, dropout):
        return fa.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, causal=True)

    return FlashKernels("flash-attn 2", dense, varlen, dropout=True, min_capability=(8, 0), auto=True)


def _flash4(cute) -> FlashKernels:
    def dense(q, k, v, dropout):
        return cute.flash_attn_func(q, k, v, causal=True)[0]

    def varlen(q, k, v, cu, max_len, dropout):
        return cute.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                           max_seqlen_k=max_len, causal=True)[0]

    # Not auto: on an H200 its kernels take 11% less device time than cuDNN's at llama-1.3b's
    # attention, but each forward and backward spends about 1.1 ms on the host (cuDNN 0.25 ms),
    # and the training step came out no faster (docs/benchmarks.md, 2026-12-01).
    return FlashKernels("flash-attn 4 (CuTe)", dense, varlen, dropout=False, min_capability=(8, 0), auto=False)


@functools.lru_cache(maxsize=None)
def _detect() -> tuple:
    """(the installed package's kernels or None, why none was found)."""
    try:
        import flash_attn
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    if hasattr(flash_attn, "flash_attn_func"):  # FlashAttention-2 first
        return _flash2(flash_attn), ""
    try:
        from flash_attn import cute
    except ImportError as error:  # e.g. flash-attn-4 without its CuTe DSL libraries
        return None, f"{type(error).__name__}: {error}"
    return _flash4(cute), ""


def flash_kernels() -> Optional[FlashKernels]:
    """The installed package's kernels (FlashAttention-2 first), or None."""
    return _detect()[0]


def flash_import_error() -> str:
    """Why flash_kernels() found no package."""
    return _detect()[1] or "not installed"

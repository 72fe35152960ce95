"""The installed flash-attention package, behind one calling convention.

Two packages put their kernels under the `flash_attn` name:
- FlashAttention-2 (`flash_attn.flash_attn_func`): Ampere and later, with dropout;
- FlashAttention-4's CuTe kernels (`flash_attn.cute`, the `flash-attn-4` wheel): Ampere to
  Blackwell kernels compiled just in time, no dropout; both functions return (out, lse).
Both take [b, s, n, d] tensors whose last dimension is contiguous (other strides are free, so
the [s, b, n, d] q, k, v go in without a copy) and k, v with fewer heads for GQA. Their public
functions return the output [b, s, n, d]-contiguous, which the [s, b, h] activations must then
copy; FlashAttention-4's dense path here writes it in q's layout instead (`_Flash4Dense`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
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


class _Flash4Dense(torch.autograd.Function):
    """FlashAttention-4's causal attention with its output allocated like q: in Trellis's
    [s, b, n, d] storage, so the [s, b, h] activations view it. Through the public function
    the output came back [b, s, n, d]-contiguous, and the output projection copied it in its
    forward and again in its backward (docs/benchmarks.md, 2026-12-01, eighteenth)."""

    @staticmethod
    def forward(ctx, q, k, v, interface):
        out = torch.empty_like(q)  # q's strides, as q is dense and non-overlapping
        out, lse = interface._flash_attn_fwd(q, k, v, causal=True, out=out)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.interface = interface
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.interface._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
        return dq, dk, dv, None


def _writes_into_given_output(interface) -> bool:
    """Whether FA4's interface module has the forward that takes `out` and the backward that
    pairs with it (private functions: checked, not assumed)."""
    forward, backward = (getattr(interface, name, None) for name in ("_flash_attn_fwd", "_flash_attn_bwd"))
    if not (callable(forward) and callable(backward)):
        return False
    forward_params, backward_params = (list(inspect.signature(f).parameters) for f in (forward, backward))
    return ("out" in forward_params and "causal" in forward_params and "causal" in backward_params
            and backward_params[:6] == ["q", "k", "v", "out", "dout", "lse"])


def _flash4(cute, interface=None) -> FlashKernels:
    def dense_public(q, k, v, dropout):
        return cute.flash_attn_func(q, k, v, causal=True)[0]

    def dense_in_q_layout(q, k, v, dropout):
        return _Flash4Dense.apply(q, k, v, interface)

    def varlen(q, k, v, cu, max_len, dropout):
        return cute.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                           max_seqlen_k=max_len, causal=True)[0]

    dense = dense_in_q_layout if interface is not None and _writes_into_given_output(interface) else dense_public
    # Not auto. With the output in q's layout a one-H200 llama-1.3b step runs 0.8-1.7% faster
    # than with cuDNN, but each forward and backward spends about 1.1 ms on the host (cuDNN
    # 0.25 ms), which host-bound runs pay in full: at micro-batch 1 the step was 13-41%
    # slower (docs/benchmarks.md, 2026-12-01, eighteenth). Each new shape also compiles.
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
    return _flash4(cute, getattr(cute, "interface", None)), ""


def flash_kernels() -> Optional[FlashKernels]:
    """The installed package's kernels (FlashAttention-2 first), or None."""
    return _detect()[0]


def flash_import_error() -> str:
    """Why flash_kernels() found no package."""
    return _detect()[1] or "not installed"

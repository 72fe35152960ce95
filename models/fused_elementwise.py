"""Elementwise pieces of the layer (QKV split + RoPE, SwiGLU): one CUDA kernel per pass on
CUDA (csrc/swiglu.cu, csrc/qkv_rope.cu, through csrc/loader.py), else the torch code below,
fused by torch.compile.

Eager, RoPE is five kernels per tensor (two muls, a split, a negation, a concatenation) and
SwiGLU three, each a full pass over the activations, forward and again backward: on an H100
that was about a fifth of a llama-1.3b step. Compiled, each becomes one kernel per pass, but
Inductor's backward kernels ran at a third to half of the copy bandwidth on an H200, which the
hand-written kernels reach. The compiled functions stay for what the kernels do not take
(per-sample RoPE positions, odd widths, compiled layers). CPU runs the eager code, which is
also what the kernels and the compiled version are checked against.

The QKV split and RoPE are one function so that their backward is one kernel too: it reads
the q/k/v gradients and writes the fused qkv gradient directly (split's backward would
otherwise be a separate concatenation). RoPE runs on the [s, b, n, d] layout of the qkv
projection, so q/k/v reach attention as [b, n, s, d] views of [s, b, n, d] memory; cuDNN and
flash attention take those strides as they are and return their output in the same layout, so
going back to [s, b, h] after attention is a view, not a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from csrc import loader
from models.rope import apply_rope, rope_for_sbnd
from parallel.compiled import for_device


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def split_qkv_rope_sbnd(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """qkv [s, b, (heads + 2 kv_heads) d] -> q [s, b, heads, d], k and v [s, b, kv_heads, d],
    each dense, RoPE applied to q and k when cos/sin are given."""
    s, b = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k = q.reshape(s, b, heads, head_dim), k.reshape(s, b, kv_heads, head_dim)
    # A dense v (written in the same kernel pass as q and k): attention would otherwise copy the
    # strided slice of qkv itself, outside the fused kernel.
    v = v.reshape(s, b, kv_heads, head_dim).contiguous()
    if cos is not None:
        cos, sin = rope_for_sbnd(cos), rope_for_sbnd(sin)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def _to_bnsd(tensors):
    return tuple(t.permute(1, 2, 0, 3) for t in tensors)


def split_qkv_rope(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """As split_qkv_rope_sbnd, returned as [b, n, s, d] views of the [s, b, n, d] memory."""
    return _to_bnsd(split_qkv_rope_sbnd(qkv, cos, sin, heads, kv_heads, head_dim))


def fused_split_qkv_rope(qkv, rope, heads: int, kv_heads: int, head_dim: int):
    cos, sin = rope if rope is not None else (None, None)
    if loader.split_qkv_rope_supported(qkv, cos, sin, heads, kv_heads, head_dim):
        return _to_bnsd(loader.split_qkv_rope(qkv, cos, sin, heads, kv_heads))
    # The permutation to [b, n, s, d] stays outside the compiled function: AOTAutograd makes
    # the gradients of a compiled function's outputs contiguous, which for permuted outputs
    # meant three full copies (dq, dk, dv) per layer in the backward. Outside, the
    # permutation's own backward turns attention's gradients back into dense [s, b, n, d].
    return _to_bnsd(for_device(split_qkv_rope_sbnd, qkv)(qkv, cos, sin, heads, kv_heads, head_dim))


def fused_swiglu(h):
    if loader.swiglu_supported(h):
        return loader.swiglu(h)
    return for_device(swiglu, h)(h)

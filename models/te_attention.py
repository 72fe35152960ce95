"""Transformer Engine's attention as a backend (`model.attention_backend te`), where TE is
installed: `te.DotProductAttention`, which picks among its own kernels (cuDNN's fused attention
on Hopper, flash-attn where installed, its unfused fallback).

Trellis's q, k, v are [b, n, s, d] views of [s, b, n, d] storage, which is TE's `sbhd` layout:
they go in without a copy, and TE's [s, b, n * d] output is what the output projection reads.
Packed documents use TE's `thd` layout with cumulative document lengths (`padding_causal`),
as flash-attn's varlen kernel does. The TE modules hold no weights; one is kept per shape.
Without attention dropout: TE would draw its masks from its own generator, not from the
per-tensor-parallel-rank streams that make Trellis's masks differ across TP ranks.
"""
from __future__ import annotations

from typing import Optional

import torch

from parallel.te_import import import_te

_modules: dict = {}


def unusable_reason(q: torch.Tensor, dropout: float) -> Optional[str]:
    """Why TE's attention cannot run this call, or None when it can."""
    modules, error = import_te()
    if modules is None:
        return f"transformer_engine cannot be imported ({error})"
    if dropout > 0:
        return (f"Trellis runs Transformer Engine's attention without dropout (model.attention_dropout is "
                f"{dropout}; use sdpa or flash)")
    if not q.is_cuda:
        return "Transformer Engine's attention runs on CUDA tensors only"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"Transformer Engine's attention takes bf16 or fp16 here, not {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"Transformer Engine's attention takes head dims that are multiples of 8 up to 256, not {q.shape[-1]}"
    return None


def _module(heads: int, kv_heads: int, head_dim: int, qkv_format: str, mask_type: str):
    key = (heads, kv_heads, head_dim, qkv_format, mask_type)
    if key not in _modules:
        te = import_te()[0][0]
        _modules[key] = te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0,
                                               qkv_format=qkv_format, attn_mask_type=mask_type)
    return _modules[key]


# Dynamo cannot trace TE's DotProductAttention (an InternalTorchDynamoError on torch 2.11 with
# TE 2.20), so under `model.compile true` the layer's graph breaks around these two calls.
@torch.compiler.disable
def dense(q, k, v):
    """Causal attention of [b, n, s, d] q and [b, n_kv, s, d] k, v; returns [b, n, s, d]."""
    b, n, s, d = q.shape
    attention = _module(n, k.shape[1], d, "sbhd", "causal")
    out = attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v)))  # [s, b, n * d]
    return out.view(s, b, n, d).permute(1, 2, 0, 3)


@torch.compiler.disable
def packed(q, k, v, cu_seqlens: torch.Tensor, max_len: int):
    """Causal attention within each document; cu_seqlens: int32 starts of the documents of all
    samples laid end to end (and the total), max_len the longest document."""
    b, n, s, d = q.shape
    tokens = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]  # [b * s, heads, d]
    attention = _module(n, k.shape[1], d, "thd", "padding_causal")
    out = attention(*tokens, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_len,
                    max_seqlen_kv=max_len)
    return out.view(b, s, n, d).transpose(1, 2)

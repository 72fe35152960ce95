"""Rotary position embeddings (the rotate-half convention of Llama/HF)."""
from __future__ import annotations

import torch


def rope_cache(seq_len: int, head_dim: int, theta: float, device, position_ids=None):
    """cos/sin of shape [s, d] (or [b, s, d] for explicit per-sample position ids), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if position_ids is None:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    else:
        positions = position_ids.to(torch.float32)
    freqs = positions.unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_for_sbnd(table: torch.Tensor) -> torch.Tensor:
    """cos or sin of rope_cache ([s, d] or [b, s, d]) shaped to broadcast over [s, b, n, d]."""
    if table.dim() == 3:
        return table.permute(1, 0, 2).unsqueeze(2)
    return table[:, None, None, :]


def apply_rope(x, cos, sin):
    """x: [b, n, s, d] with cos/sin [s, d] or [b, s, d], or any layout with cos/sin already
    shaped to broadcast over it (rope_for_sbnd). Computed in x's dtype with cos/sin cast to it,
    as Hugging Face's Llama does (bf16 under autocast: no fp32 copies of q and k)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin

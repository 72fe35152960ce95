"""One transformer layer built from tensor-parallel pieces. Activations are [s, b, h]
([s/tp, b, h] between blocks under sequence parallelism)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import attend
from models.config import ModelConfig
from models.norms import Norm
from models.fused_elementwise import fused_split_qkv_rope, fused_swiglu
from parallel import comm
from parallel.layers import ColumnParallelLinear, RowParallelLinear


def lora_aliases(cfg: ModelConfig) -> dict:
    """Hugging Face-style LoRA target names -> (module pattern, fused block index or None for
    the whole module). q/k/v are blocks of the fused qkv, gate/up of SwiGLU's fused fc1."""
    aliases = {"q": ("layers.*.attn.qkv", 0), "k": ("layers.*.attn.qkv", 1), "v": ("layers.*.attn.qkv", 2),
               "o": ("layers.*.attn.proj", None), "down": ("layers.*.mlp.fc2", None)}
    if cfg.activation == "swiglu":
        aliases.update(gate=("layers.*.mlp.fc1", 0), up=("layers.*.mlp.fc1", 1))
    else:
        aliases["up"] = ("layers.*.mlp.fc1", None)
    return aliases


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads; heads split across TP ranks."""

    def __init__(self, cfg: ModelConfig, tp_group, sequence_parallel, rng, device=None, dtype=None):
        super().__init__()
        tp = comm.group_size(tp_group)
        self.head_dim = cfg.head_dim()
        self.local_heads = cfg.num_heads // tp
        self.local_kv_heads = cfg.num_kv_heads // tp
        self.dropout = cfg.attention_dropout
        self.backend = cfg.attention_backend
        self.rng = rng
        kv = cfg.num_kv_heads * self.head_dim
        qkv_bias = bool(cfg.add_qkv_bias or cfg.add_bias_linear)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, (cfg.hidden_size, kv, kv), tp_group, bias=qkv_bias,
                                        sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp_group, bias=bool(cfg.add_bias_linear),
                                      sequence_parallel=sequence_parallel, device=device, dtype=dtype)

    def forward(self, x, rope=None, document_ids=None, kv_cache=None, residual=None):
        """kv_cache: this layer's slot of a models.kv_cache.KVCache (generation), or None;
        residual: added to the output (see RowParallelLinear.forward)."""
        qkv = self.qkv(x)
        s, b = qkv.shape[0], qkv.shape[1]
        q, k, v = fused_split_qkv_rope(qkv, rope, self.local_heads, self.local_kv_heads, self.head_dim)
        out = kv_cache.attend(q, k, v) if kv_cache is not None else self._attend(q, k, v, document_ids)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.proj(out, residual)

    def _attend(self, q, k, v, document_ids):
        dropout = self.dropout if self.training else 0.0
        # Heads are TP-split, so their dropout masks must differ across TP ranks.
        ctx = self.rng.fork() if dropout > 0 else contextlib.nullcontext()
        with ctx:
            return attend(q, k, v, dropout=dropout, document_ids=document_ids, backend=self.backend)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, sequence_parallel, device=None, dtype=None):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        parts = (cfg.ffn_hidden_size, cfg.ffn_hidden_size) if self.swiglu else (cfg.ffn_hidden_size,)
        bias = bool(cfg.add_bias_linear)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, parts, tp_group, bias=bias,
                                        sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp_group, bias=bias,
                                     sequence_parallel=sequence_parallel, device=device, dtype=dtype)

    def forward(self, x, residual=None):
        """residual: added to the output (see RowParallelLinear.forward)."""
        h = self.fc1(x)
        if self.swiglu:
            h = fused_swiglu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h, residual)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, sequence_parallel, rng, device=None, dtype=None):
        super().__init__()
        self.sequence_parallel, self.rng, self.dropout = sequence_parallel, rng, cfg.dropout
        self.norm1 = Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, sequence_parallel, device, dtype)
        self.attn = Attention(cfg, tp_group, sequence_parallel, rng, device, dtype)
        self.norm2 = Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, sequence_parallel, device, dtype)
        self.mlp = MLP(cfg, tp_group, sequence_parallel, device, dtype)

    def forward(self, x, rope=None, document_ids=None, kv_cache=None):
        # Each norm hands x back as the residual stream (so the norm's backward kernel adds the
        # stream's gradient into its dx), and each sublayer's output projection adds it.
        normed, x = self.norm1.with_residual(x)
        x = self._residual_add(x, lambda residual: self.attn(normed, rope, document_ids, kv_cache, residual))
        normed, x = self.norm2.with_residual(x)
        return self._residual_add(x, lambda residual: self.mlp(normed, residual))

    def _residual_add(self, x, sublayer):
        """x + dropout(sublayer(None)). Without dropout the sublayer gets x itself: its output
        projection adds it, in the GEMM's epilogue where it can."""
        if not self.training or self.dropout == 0:
            return sublayer(x)
        out = sublayer(None)
        # Sequence-parallel slices differ per TP rank, so their masks must too.
        ctx = self.rng.fork() if self.sequence_parallel else contextlib.nullcontext()
        with ctx:
            return x + F.dropout(out, self.dropout, training=True)

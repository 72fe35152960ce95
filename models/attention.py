"""Attention backends behind one switch (`model.attention_backend`).

- `flash`: the flash-attn package, FlashAttention-2 or FlashAttention-4's CuTe kernels
  (models/flash_kernels.py; on CUDA, in bf16/fp16); packed documents through its varlen kernel
  with cumulative sequence lengths.
- `sdpa`: torch's scaled_dot_product_attention (which itself picks flash / cuDNN / efficient
  kernels); packed documents through a boolean block-diagonal causal mask.
- `flex`: torch FlexAttention with a document block mask (CUDA; sparse, so packed sequences
  cost what their documents cost).
- `te`: Transformer Engine's DotProductAttention (models/te_attention.py; on CUDA, bf16/fp16,
  without dropout); packed documents through its `thd` layout.
- `auto`: FlashAttention-2 when installed and able to run the call, else SDPA; packed documents
  on CUDA use flex then. FlashAttention-4 runs only when asked for by name: its kernels make a
  GPU-bound step 1-2% faster, but its host time per call makes a host-bound one far slower
  (docs/benchmarks.md, 2026-12-01, eighteenth).
q: [b, n, s, d]; k, v: [b, n_kv, s, d].
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from models import te_attention
from models.flash_kernels import flash_import_error, flash_kernels

def choose_backend(requested: str, q, document_ids, dropout: float = 0.0) -> str:
    if requested == "flash":
        kernels = flash_kernels()
        if kernels is None:
            raise RuntimeError("model.attention_backend is flash but no flash-attn package can be imported "
                               f"({flash_import_error()})")
        reason = kernels.unusable_reason(q, dropout)
        if reason is not None:
            raise RuntimeError(f"model.attention_backend is flash, but {reason}")
        return requested
    if requested == "te":
        reason = te_attention.unusable_reason(q, dropout)
        if reason is not None:
            raise RuntimeError(f"model.attention_backend is te, but {reason}")
        return requested
    if requested != "auto":
        return requested
    kernels = flash_kernels()
    if kernels is not None and kernels.auto and kernels.unusable_reason(q, dropout) is None:
        return "flash"
    if document_ids is not None and q.is_cuda:
        return "flex"
    return "sdpa"


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean: query i sees key j when j <= i and both lie in one document."""
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


class _MaskOfLastDocuments:
    """The mask last built from a document_ids tensor, handed to every layer of a forward that
    passes that same tensor (unchanged since): built per layer, a flex block mask costs more
    host time than the layer's attention. Held by a weak reference, so a new batch's tensor at
    a freed one's address is never mistaken for it.

    A mask built while a CUDA graph is captured lives in the graph's memory and is rebuilt by
    its replays (models/layer_graphs.py: the first layer's graph builds it, the later layers'
    graphs read it), so it is handed only to captures, and an eager mask never to a capture."""

    def __init__(self):
        self.key, self.mask = None, None

    def get(self, kind, document_ids: torch.Tensor, build):
        if torch.compiler.is_compiling():
            return build()
        capturing = document_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (document_ids._version, kind, capturing)
        if self.key is not None:
            ref, cached = self.key[0], self.key[1:]
            if ref() is document_ids and cached == key:
                return self.mask
        self.mask = build()
        self.key = (weakref.ref(document_ids), *key)
        return self.mask


_LAST_MASK = _MaskOfLastDocuments()


def attend(q, k, v, *, dropout: float = 0.0, document_ids=None, backend: str = "auto"):
    """Causal attention, restricted to documents when `document_ids` [b, s] is given."""
    chosen = choose_backend(backend, q, document_ids, dropout)
    gqa = k.shape[1] != q.shape[1]
    if chosen == "flash":
        return _flash(q, k, v, dropout, document_ids)
    if chosen == "te":
        if document_ids is None:
            return te_attention.dense(q, k, v)
        return te_attention.packed(q, k, v, *_varlen_boundaries_of_forward(document_ids, q.device))
    if chosen == "flex" and document_ids is not None:
        block_mask = _LAST_MASK.get(("flex", q.device), document_ids,
                                    lambda: _document_block_mask(document_ids, q.device))
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    mask = None
    if document_ids is not None:
        mask = _LAST_MASK.get("dense", document_ids, lambda: document_causal_mask(document_ids))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          enable_gqa=gqa)


def _flash(q, k, v, dropout, document_ids):
    kernels = flash_kernels()
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, s, n, d]
    if document_ids is None:
        return kernels.dense(q, k, v, dropout).transpose(1, 2)
    b, s = document_ids.shape
    cu, max_len = _varlen_boundaries_of_forward(document_ids, q.device)
    out = kernels.varlen(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                         v.reshape(b * s, *v.shape[2:]), cu, max_len, dropout)
    return out.reshape(b, s, *out.shape[1:]).transpose(1, 2)


def _varlen_boundaries_of_forward(document_ids, device):
    """_varlen_boundaries, built once for all the layers of a forward (flash's and TE's)."""
    return _LAST_MASK.get(("varlen", device), document_ids, lambda: _varlen_boundaries(document_ids))


def _varlen_boundaries(document_ids):
    """(int32 cumulative lengths, longest length) of the documents of every sample laid end to
    end, as varlen kernels take them. Built once per forward: the longest length is read on the
    host, a device sync."""
    b, s = document_ids.shape
    flat_ids = document_ids + torch.arange(b, device=document_ids.device).unsqueeze(1) * (document_ids.max() + 1)
    flat_ids = flat_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(flat_ids, prepend=flat_ids[:1] - 1)).squeeze(-1)
    cu = torch.cat([starts, torch.tensor([b * s], device=document_ids.device)]).to(torch.int32)
    return cu, int(torch.diff(cu).max())


def _document_block_mask(document_ids, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    b, s = document_ids.shape
    return create_block_mask(mask_mod, b, None, s, s, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)

"""Keys and values of past positions, for generation one token at a time.

A cache holds, for every layer of this rank (its pipeline stage, its tensor-parallel heads),
key and value tensors [batch, local kv heads, max_length, head_dim], allocated whole at the
layer's first forward. One model forward appends `s` positions: `begin(document_ids)` before
it records which segment each new position belongs to and builds the attention mask once for
every layer; `advance()` after it moves the fill mark. Attention is causal within a segment,
as for packed training samples: a left-padded prompt puts its padding in segment 0 and the
real tokens in segment 1, so no real token attends to padding and padding rows attend to
themselves (never to nothing, which would make a softmax of NaNs).

Static decode (`static_decode=True`): a one-token forward touches no shape or index that
changes from step to step, so it can be captured once as a CUDA graph and replayed
(engine/decode_graph.py). Its key and value are written at the position held in the device
tensor `decode_position`, and it attends under the mask `decode_mask` [b, 1, 1, max_length]
(False past the fill mark), both rewritten in place by `begin`. On a GPU, where the kernels take
the head layout (one kv head a query head, or 2..8 of them: loader.decode_heads_supported), one
launch writes the slot and reads only the slots up to the fill mark (csrc/decode_attention.cu,
decode_attention_grouped.cu); otherwise SDPA attends over all `max_length` slots. Forwards of
several positions (the prompt) take the sliced path either way.

An eager decode step (one new position on the sliced path: `decode="eager"`, TP, PP) keeps SDPA
off its cuDNN backend. cuDNN builds an execution plan for each new shape, and here the key length
grows every step: on an H200, 64 eager steps of llama-1.3b after a prompt of a new width took
4.7 s with cuDNN's plans and 0.9 s without; on a repeated shape both took 0.95 s
(docs/benchmarks.md).
Prompts keep every backend: their plan is built once per width, and cuDNN's kernel was the faster
one on long prompts (8 x 2048: 91 ms against 124 ms for the whole prompt forward).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from csrc import loader

# SDPA backends of an eager decode step: every one but cuDNN (see the module notes).
EAGER_STEP_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class LayerCache:
    """One layer's slot in a KVCache: appends this forward's keys and values and attends."""

    def __init__(self, cache: "KVCache", layer_id: int):
        self.cache, self.layer_id = cache, layer_id

    def attend(self, q, k, v):
        """q: [b, n, s, d], k/v: [b, n_kv, s, d] of the new positions -> [b, n, s, d]."""
        cache = self.cache
        keys, values = cache.storage(self.layer_id, k)
        if cache.decoding_static:
            visible = cache.mask.view(q.shape[0], cache.max_length)  # decode_mask, [b, 1, 1, max_length]
            return static_decode_attention(q, k, v, keys, values, visible, cache.decode_position)
        start, end = cache.length, cache.length + k.shape[2]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        with sdpa_kernel(EAGER_STEP_BACKENDS) if q.shape[2] == 1 else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=cache.mask,
                                                  enable_gqa=q.shape[1] != k.shape[1])


def static_decode_attention(q, k, v, keys, values, visible, position):
    """A static-decode step: k, v [b, n_kv, 1, d] written at slot `position` (a one-element device
    tensor) of keys/values [b, n_kv, max_length, d], and q [b, n, 1, d] attended over the slots
    `visible` [b, max_length] allows (none past position). Where it applies (a GPU and a head
    layout the kernels take: loader.decode_attention_supported), csrc/decode_attention.cu in one
    launch that reads only the slots up to position; elsewhere the torch reference, which reads all
    max_length of them (a fixed shape, so it too can be captured)."""
    if loader.decode_attention_supported(q, keys):
        return loader.decode_attention(q, k, v, keys, values, visible, position)
    return static_decode_attention_reference(q, k, v, keys, values, visible, position)


def static_decode_attention_reference(q, k, v, keys, values, visible, position):
    """static_decode_attention in torch ops (any device and dtype)."""
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :],
                                          enable_gqa=q.shape[1] != k.shape[1])


class KVCache:
    def __init__(self, batch: int, max_length: int, device, static_decode: bool = False):
        self.keys, self.values = {}, {}  # layer id -> [b, kv heads, max_length, head dim]
        self.max_length, self.static_decode = max_length, static_decode
        self.document_ids = torch.zeros(batch, max_length, dtype=torch.long, device=device)
        self.key_positions = torch.arange(max_length, device=device)
        if static_decode:
            self.decode_position = torch.zeros(1, dtype=torch.long, device=device)
            self.decode_mask = torch.zeros(batch, 1, 1, max_length, dtype=torch.bool, device=device)
        self.length, self.pending, self.mask = 0, 0, None

    @property
    def decoding_static(self) -> bool:
        return self.static_decode and self.pending == 1

    def begin(self, document_ids: torch.Tensor) -> None:
        """Before a forward of the new positions' segment ids [b, s]: build their mask."""
        s = document_ids.shape[1]
        end = self.length + s
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {self.length} + {s} do not fit")
        self.document_ids[:, self.length:end] = document_ids
        self.pending = s
        if self.decoding_static:
            visible = (self.document_ids == document_ids) & (self.key_positions <= self.length)  # [b, max_length]
            self.decode_mask.copy_(visible[:, None, None, :])
            self.decode_position.fill_(self.length)
            self.mask = self.decode_mask
            return
        query_pos = self.key_positions[self.length:end].unsqueeze(-1)
        causal = self.key_positions[:end].unsqueeze(0) <= query_pos  # [s, end]
        same = document_ids.unsqueeze(-1) == self.document_ids[:, :end].unsqueeze(1)  # [b, s, end]
        self.mask = (same & causal).unsqueeze(1)

    def storage(self, layer_id: int, k: torch.Tensor):
        """A layer's key and value tensors, allocated at its first forward in the dtype its keys
        are computed in (the autocast dtype, not necessarily the weights')."""
        if layer_id not in self.keys:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer_id] = k.new_zeros(shape)
            self.values[layer_id] = k.new_zeros(shape)
        return self.keys[layer_id], self.values[layer_id]

    def advance(self) -> None:
        self.length, self.pending = self.length + self.pending, 0

    def layer(self, layer_id: int) -> LayerCache:
        return LayerCache(self, layer_id)

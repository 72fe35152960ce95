"""Choosing the next token from vocab-split logits, the same token on every TP rank.

Each TP rank holds the logits of one contiguous slice of the (padded) vocabulary for the last
position, [batch, vocab/tp]. Nothing gathers the full logits:

- greedy: each rank's maximum and its global id are all-gathered ([tp, batch] numbers) and the
  largest wins, ties going to the lowest id as in torch.argmax over the whole vocabulary;
- temperature sampling (no top-k / top-p): the Gumbel-max trick, argmax(logits / T + g) with
  g = -log(-log(u)) drawn for the whole unpadded vocabulary from a generator every rank seeds
  alike and sliced per rank, so the draw is one exact sample of softmax(logits / T), and it
  is the same at every TP size;
- top-k and/or top-p: each rank's top-k candidates are all-gathered ([tp, batch, k]) and the
  global top-k taken from them (exact). Top-p without top-k needs every candidate, so then each
  rank contributes its whole slice of this one position: a [batch, vocab] gather, small next
  to the forward pass. Candidates are ordered by (logit desc, id asc) and sampled by inverse
  CDF with one uniform per row from the shared generator.

The shared generator must be seeded identically on the TP ranks of a model replica (and its
draws consumed identically), which makes every rank pick the same token without a broadcast.
"""
from __future__ import annotations

import dataclasses

import torch

from parallel import comm


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be non-negative (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def mask_padded_vocab(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """fp32 copy of the local logits with the padding rows of the vocabulary at -inf."""
    logits = logits.float().clone()
    valid = min(max(vocab_size - vocab_start, 0), logits.shape[-1])
    logits[..., valid:] = float("-inf")
    return logits


def vocab_parallel_argmax(logits: torch.Tensor, group, vocab_start: int) -> torch.Tensor:
    """Global argmax ids [b] of vocab-split logits [b, v/tp], lowest id on ties."""
    values, local_ids = logits.max(dim=-1)
    if comm.group_size(group) == 1:
        return local_ids + vocab_start
    # float64 holds any vocabulary id exactly; one gather carries value and id together.
    pairs = torch.stack([values.double(), (local_ids + vocab_start).double()], dim=-1).unsqueeze(0)
    gathered = comm.all_gather_dim(pairs, group, 0)  # [tp, b, 2]
    best_rank = gathered[..., 0].argmax(dim=0)  # first (lowest-id) rank among equal maxima
    return gathered[..., 1].gather(0, best_rank.unsqueeze(0)).squeeze(0).long()


def gumbel_noise(batch: int, vocab_start: int, local_vocab: int, vocab_size: int, generator, device) -> torch.Tensor:
    """This rank's slice of Gumbel noise drawn for the whole unpadded vocabulary."""
    uniform = torch.rand(batch, vocab_size, generator=generator, device=device, dtype=torch.float32)
    noise = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
    local = torch.full((batch, local_vocab), float("-inf"), device=device)
    stop = min(vocab_start + local_vocab, vocab_size)
    if stop > vocab_start:
        local[:, :stop - vocab_start] = noise[:, vocab_start:stop]
    return local


def gather_candidates(logits: torch.Tensor, group, vocab_start: int, k: int):
    """The global top-k (k = 0: every id) of vocab-split logits, as (values, ids) [b, k] sorted
    by value descending, ties by id ascending."""
    local_k = logits.shape[-1] if k == 0 else min(k, logits.shape[-1])
    values, ids = logits.topk(local_k, dim=-1)
    values = comm.all_gather_dim(values, group, -1)
    ids = comm.all_gather_dim(ids + vocab_start, group, -1)
    by_id = ids.argsort(dim=-1, stable=True)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)
    values, ids = values.gather(-1, by_value), ids.gather(-1, by_value)
    if k:
        values, ids = values[:, :k], ids[:, :k]
    return values, ids


def sample_candidates(values: torch.Tensor, ids: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """One id per row from softmax(values), cut to the smallest prefix holding top_p of the mass."""
    probs = torch.softmax(values, dim=-1)
    if top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the better candidates
        probs = probs.masked_fill(before >= top_p, 0.0)
    cumulative = probs.cumsum(dim=-1)
    uniform = torch.rand(values.shape[0], 1, generator=generator, device=values.device, dtype=cumulative.dtype)
    choice = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).clamp(max=values.shape[-1] - 1)
    return ids.gather(-1, choice).squeeze(-1)


def sample_vocab_parallel(logits: torch.Tensor, group, vocab_start: int, vocab_size: int,
                          params: SamplingParams, generator=None) -> torch.Tensor:
    """Next-token ids [b] (global) from this rank's logits [b, v/tp]; identical on every TP rank."""
    logits = mask_padded_vocab(logits, vocab_start, vocab_size)
    if params.temperature == 0:
        return vocab_parallel_argmax(logits, group, vocab_start)
    logits = logits / params.temperature
    if params.top_k or params.top_p < 1:
        values, ids = gather_candidates(logits, group, vocab_start, params.top_k)
        return sample_candidates(values, ids, params.top_p, generator)
    noise = gumbel_noise(logits.shape[0], vocab_start, logits.shape[-1], vocab_size, generator, logits.device)
    return vocab_parallel_argmax(logits + noise, group, vocab_start)

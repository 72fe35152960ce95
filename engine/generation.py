"""Batched text generation with a KV cache, under tensor and pipeline parallelism.

Prompts are left-padded to one width, so every row's next token sits in the last column. The
padding is segment 0 and the prompt segment 1 (`document_ids`), so attention never reaches
padding, and positions count real tokens only (`position_ids` start at 0 on each row's first
token): a padded row computes what the prompt alone would. The first forward runs the whole
prompt and fills the cache; each later one runs the single newest token against it.

Tensor parallelism: each rank caches its own KV heads and the next token is chosen from the
vocab-split logits of the last position without gathering them (parallel/vocab_sampling.py),
with a generator seeded alike on every TP rank. Pipeline parallelism: one forward goes stage
by stage with send/recv (engine/inference.py); the last stage picks the token and broadcasts
it to the other stages. Sequence parallelism is switched off while generating. A row stops
after its EOS token (later positions hold the pad id); generation ends when every row has
stopped or after `max_new_tokens`.

Decode steps replay a CUDA graph where engine/decode_graph.py allows (CUDA, no TP or PP, no
FP8): the prompt runs eagerly into a static-decode cache, every later step is one graph launch.
`decode` picks the path: `auto` (graphs where they apply), `eager` (the sliced cache), `static`
(the graph's cache without a capture, on any device: what the CPU tests compare against
`eager`).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from engine.decode_graph import DecodeGraph, graphable
from engine.inference import broadcast_from_last_stage, forward_through_stages, init_pipeline_p2p, sequence_parallel_off
from models.kv_cache import KVCache
from models.layer_graphs import capture_autocast
from parallel.vocab_sampling import SamplingParams, sample_vocab_parallel


@dataclasses.dataclass
class GenerationResult:
    tokens: torch.Tensor  # [b, prompt_width + new] left-padded prompts, then the generated tokens
    prompt_width: int
    response_mask: torch.Tensor  # [b, new] bool: generated tokens up to and including EOS
    position_ids: torch.Tensor  # [b, prompt_width + new] as the model saw them
    document_ids: torch.Tensor  # [b, prompt_width + new] 0 on left padding, 1 on the sequence

    @property
    def responses(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_width:]

    def response_lists(self) -> list:
        """Each row's generated ids (EOS included when it was produced)."""
        return [row[mask].tolist() for row, mask in zip(self.responses, self.response_mask)]


def left_pad(prompts: list, pad_id: int, width: int = 0, device=None):
    """(tokens, document_ids, position_ids) [b, width] of prompts padded on the left."""
    width = max(width, max(len(p) for p in prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    document_ids = (torch.arange(width).unsqueeze(0) >= width - lengths.unsqueeze(1)).long()
    position_ids = (document_ids.cumsum(dim=1) - 1).clamp(min=0)
    return tokens.to(device), document_ids.to(device), position_ids.to(device)


def sampling_generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


DECODE_MODES = ("auto", "eager", "static")


class TextGenerator:
    """Generates from this rank's model chunks (a whole model, or one pipeline stage of it)."""

    def __init__(self, chunks, grid, device, autocast=contextlib.nullcontext, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.chunks, self.grid, self.device, self.autocast = chunks, grid, device, autocast
        self.cfg = chunks[0].cfg
        self.dtype = next(chunks[0].parameters()).dtype
        self.decode = decode
        init_pipeline_p2p(grid, device)

    @property
    def graphs(self) -> bool:
        """Whether decode steps replay a CUDA graph."""
        return self.decode == "auto" and graphable(self.chunks, self.grid, self.device)

    @property
    def last(self):
        return self.chunks[-1]

    def stage_output(self, chunk, hidden, tokens, position_ids, document_ids, cache, capturing=False):
        """One chunk's forward: its hidden states, or on the last stage the local logits [b, v/tp]
        of the last position. `capturing`: inside a CUDA-graph capture (autocast's cast cache off)."""
        with self.autocast(), capture_autocast() if capturing else contextlib.nullcontext():
            out = chunk(tokens if chunk.pre_process else None, hidden=hidden, position_ids=position_ids,
                        document_ids=None if cache is not None else document_ids, kv_cache=cache,
                        return_hidden=chunk.post_process)
            return chunk.output_logits(out[-1:])[0] if chunk.post_process else out

    def last_logits(self, tokens, position_ids, document_ids, cache):
        """Local logits [b, v/tp] of the last position on the last stage, None elsewhere."""
        def run_chunk(chunk, hidden):
            return self.stage_output(chunk, hidden, tokens, position_ids, document_ids, cache)

        if cache is not None:
            cache.begin(document_ids)
        shape = (tokens.shape[1], tokens.shape[0], self.cfg.hidden_size)
        logits = forward_through_stages(self.chunks, self.grid, run_chunk, shape, self.dtype, self.device)
        if cache is not None:
            cache.advance()
        return logits

    def next_tokens(self, logits, params: SamplingParams, generator, batch: int, vocab_limit: int) -> torch.Tensor:
        tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        if logits is not None:
            tokens = sample_vocab_parallel(logits, self.grid.tp_group, self.last.vocab_start, vocab_limit,
                                           params, generator)
        return broadcast_from_last_stage(tokens, self.grid)

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int, params: SamplingParams = None, eos_id=None,
                 pad_id: int = 0, seed: int = 0, prompt_width: int = 0, use_cache: bool = True,
                 vocab_limit: int = 0) -> GenerationResult:
        """Continue each prompt (a list of ids) by up to max_new_tokens. prompt_width pads the
        prompts to at least that width; use_cache=False recomputes the whole sequence each step
        (the reference the cache is tested against); vocab_limit > 0 never draws ids at or above
        it (a tokenizer smaller than the model's vocabulary)."""
        params = params or SamplingParams()
        params.validate()
        tokens, document_ids, position_ids = left_pad(prompts, pad_id, prompt_width, self.device)
        batch, width = tokens.shape
        if width + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt width {width} + {max_new_tokens} new tokens exceed the model's "
                             f"{self.cfg.max_position_embeddings} positions")
        cache, graph = self.decode_state(batch, width + max_new_tokens) if use_cache else (None, None)
        generator = sampling_generator(self.device, seed)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        produced = []
        step_tokens, step_positions, step_documents = tokens, position_ids, document_ids
        with sequence_parallel_off(self.chunks):
            for _ in range(max_new_tokens):
                if graph is not None and cache.length:
                    logits = self.replay(graph, cache, step_tokens, step_positions, step_documents)
                else:
                    logits = self.last_logits(step_tokens, step_positions, step_documents, cache)
                new = self.next_tokens(logits, params, generator, batch, vocab_limit or self.cfg.vocab_size)
                new = torch.where(finished, torch.full_like(new, pad_id), new)
                produced.append((new, ~finished))
                tokens = torch.cat([tokens, new.unsqueeze(1)], dim=1)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
                document_ids = torch.cat([document_ids, torch.ones_like(document_ids[:, -1:])], dim=1)
                if eos_id is not None:  # (the check waits for the device: only when rows can stop)
                    finished = finished | (new == eos_id)
                    if bool(finished.all()):
                        break
                if use_cache:
                    step_tokens, step_positions, step_documents = (t[:, -1:] for t in (tokens, position_ids, document_ids))
                else:
                    step_tokens, step_positions, step_documents = tokens, position_ids, document_ids
        return self.finish(tokens, position_ids, document_ids, produced, width, max_new_tokens, pad_id)

    def decode_state(self, batch: int, max_length: int):
        """(KV cache, decode graph or None) for one call. The graph is captured at the call's
        first decode step and dropped with the cache at its end: keeping both for the next call
        would save the capture (about a twentieth of a PPO rollout's generation) but hold the
        cache's memory through the training between rollouts."""
        if self.decode == "eager":
            return KVCache(batch, max_length, self.device), None
        cache = KVCache(batch, max_length, self.device, static_decode=self.decode == "static" or self.graphs)
        return cache, DecodeGraph(self.graph_forward(cache), batch, self.device) if self.graphs else None

    def graph_forward(self, cache):
        """The captured step: the whole model (one chunk per stage here) on one token per row."""
        def forward(tokens, positions):
            hidden = None
            for chunk in self.chunks:
                hidden = self.stage_output(chunk, hidden, tokens, positions, None, cache, capturing=True)
            return hidden
        return forward

    @staticmethod
    def replay(graph, cache, tokens, positions, documents):
        cache.begin(documents)
        logits = graph(tokens, positions)
        cache.advance()
        return logits

    @staticmethod
    def finish(tokens, position_ids, document_ids, produced, width, max_new_tokens, pad_id) -> GenerationResult:
        """Pad a generation that stopped early to max_new_tokens columns."""
        missing = max_new_tokens - len(produced)
        mask = torch.stack([alive for _, alive in produced], dim=1)
        if missing:
            batch = tokens.shape[0]
            tokens = torch.cat([tokens, tokens.new_full((batch, missing), pad_id)], dim=1)
            more = position_ids[:, -1:] + torch.arange(1, missing + 1, device=tokens.device)
            position_ids = torch.cat([position_ids, more], dim=1)
            document_ids = torch.cat([document_ids, document_ids.new_ones(batch, missing)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(batch, missing)], dim=1)
        return GenerationResult(tokens, width, mask, position_ids, document_ids)

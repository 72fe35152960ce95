"""One-token decode steps of generation replayed from a CUDA graph.

Why: a decode step runs the whole model on one new token per row. For llama-1.3b at batch 64
on an H200 its GPU work is about 3 ms, while launching its few hundred kernels from Python took
about 25 ms, so eager decoding waited on the host. Captured once, a step is one graph launch
(8x the generated tokens/s there, docs/benchmarks.md).

What makes a step capturable: every tensor it reads or writes keeps its address and shape from
step to step. The new tokens and positions are copied into `tokens` and `positions`; the KV
cache is a static-decode `models.kv_cache.KVCache`, which writes each step's keys and values at
a device-held position and attends over its whole length under a mask it rewrites in place
(`KVCache.begin`, run before each replay). The logits come back in the graph's own output
tensor, valid until the next replay.

Where it applies (`graphable`): CUDA, one tensor- and pipeline-parallel rank (a TP decode
would capture its all-reduces, a PP one its send/recv; both run eagerly), and no FP8 linear
(their amax history and weight cache are host-side state a replay would not update). A graph
lives for one generate call (engine/generation.py), so it never outlives the parameters,
cache and buffers whose addresses it holds.
"""
from __future__ import annotations

import torch

from parallel.fp8_state import uses_fp8


def graphable(chunks, grid, device) -> bool:
    return device.type == "cuda" and grid.tp == 1 and grid.pp == 1 and not any(uses_fp8(c) for c in chunks)


class DecodeGraph:
    """`forward(tokens [b, 1], positions [b, 1]) -> logits [b, v]` captured at its first call."""

    def __init__(self, forward, batch: int, device):
        self.forward = forward
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph, self.logits = None, None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits

    def capture(self) -> None:
        # A first run on a side stream outside the capture sets up what must not happen inside
        # one (cuBLAS handles and workspaces, lazily loaded kernels). It writes the cache slot
        # the replay writes again, with the same values.
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.forward(self.tokens, self.positions)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.forward(self.tokens, self.positions)
        self.graph = graph

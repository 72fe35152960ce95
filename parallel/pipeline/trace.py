"""Chrome-trace events of a pipeline schedule (open in chrome://tracing or ui.perfetto.dev).

Each rank writes its own file, `PATH` with `.rank<N>` before the extension; load several at
once in Perfetto to see the bubble. Compute spans go on one track and communication on
another. On CUDA, spans synchronise the device so their length is the work's, not the launch's:
tracing is for looking at a schedule, not for measuring speed.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch

COMPUTE_TRACK, COMM_TRACK = 0, 1


def rank_path(path: str, rank: int) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


class NullTracer:
    """Tracing off: spans cost nothing."""

    def span(self, name: str, track: int = COMPUTE_TRACK, **args):
        return contextlib.nullcontext()

    def save(self) -> None:
        pass


class ChromeTracer:
    def __init__(self, path: str, rank: int, device: torch.device):
        self.path, self.rank, self.device = rank_path(path, rank), rank, device
        self.events = []
        self.origin_ns = time.perf_counter_ns()

    def _now_us(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter_ns() - self.origin_ns) / 1000.0

    @contextlib.contextmanager
    def span(self, name: str, track: int = COMPUTE_TRACK, **args):
        start = self._now_us()
        try:
            yield
        finally:
            self.events.append({"name": name, "ph": "X", "ts": start, "dur": self._now_us() - start,
                                "pid": self.rank, "tid": track, "args": args})

    def save(self) -> None:
        names = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        names += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": label}}
                  for tid, label in ((COMPUTE_TRACK, "compute"), (COMM_TRACK, "p2p"))]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as handle:
            json.dump({"traceEvents": names + self.events, "displayTimeUnit": "ms"}, handle)


def build_tracer(path: str, rank: int, device: torch.device):
    return ChromeTracer(path, rank, device) if path else NullTracer()

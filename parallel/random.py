"""Model-parallel RNG: dropout that differs across TP ranks where activations are split and
matches where they are replicated.

The default generator is seeded identically on all TP ranks of a pipeline stage (replicated
regions: residual dropout without sequence parallelism). `RNGTracker.fork()` switches to a
second stream seeded by TP rank, for regions holding TP-split activations (attention dropout
over local heads, dropout on sequence-parallel slices).
"""
from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Holds the TP-distinct generator state and swaps it in for `fork()` regions."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tp_state: torch.Tensor | None = None

    def seed(self, seed: int, tp_rank: int, pp_rank: int) -> None:
        stage_seed = seed + 100 * pp_rank
        torch.manual_seed(stage_seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(stage_seed)
        saved = _get_state(self.device)
        torch.manual_seed(stage_seed + TP_SEED_OFFSET + tp_rank)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(stage_seed + TP_SEED_OFFSET + tp_rank)
        self.tp_state = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self):
        if self.tp_state is None:
            raise RuntimeError("RNGTracker.seed() must run before fork()")
        saved = _get_state(self.device)
        _set_state(self.device, self.tp_state)
        try:
            yield
        finally:
            self.tp_state = _get_state(self.device)
            _set_state(self.device, saved)

    def get_states(self) -> dict:
        return {"default": _get_state(self.device), "tp": self.tp_state}

    def set_states(self, states: dict) -> None:
        _set_state(self.device, states["default"])
        self.tp_state = states["tp"]

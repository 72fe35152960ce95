"""Training controls fine-tuners expect: freezing by name, layer-wise LR decay, early
stopping, a loss-spike guard.

None of their running state is in the checkpoint yet: a resumed run starts the spike guard's
window and the early stopper's best loss afresh.
"""
from __future__ import annotations

import collections
import fnmatch
import math
import re

from engine.launch import UserError


class TrainingStopped(UserError):
    """The loss-spike guard gave up; the message says why in one sentence."""


def freeze_parameters(model_chunks, patterns: list) -> list:
    """Set requires_grad False on every parameter whose (layout-free) name matches one of the
    fnmatch patterns; returns the frozen names. Must run before the optimizer is built, which
    takes only trainable parameters (so frozen ones get no gradient buffer and no state)."""
    frozen = []
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                param.requires_grad_(False)
                frozen.append(name)
    return frozen


EMBEDDING_NAMES = ("embedding.weight", "position_embedding")
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_lr_scale(name: str, num_layers: int, decay: float) -> float:
    """Layer-wise LR decay (BEiT/ELECTRA): layer i (0-based, of L) trains at decay^(L-i), the
    embeddings at decay^(L+1), the final norm and output layer at 1. `name` is layout-free
    (layers carry their global index), so every pipeline stage agrees."""
    match = LAYER_INDEX.match(name)
    if match:
        return decay ** (num_layers - int(match.group(1)))
    if name in EMBEDDING_NAMES:
        return decay ** (num_layers + 1)
    return 1.0


def apply_layer_lr_decay(model_chunks, decay: float, num_layers: int) -> None:
    """Tag each parameter with its `lr_scale` (the optimizer groups by it, the LR scheduler
    multiplies it in). A tied output layer's copy scales as the embedding it mirrors, so both
    copies take the same update."""
    if decay == 1.0:
        return
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            param.lr_scale = layer_lr_scale(chunk.init_key(name), num_layers, decay)


class SpikeGuard:
    """Skip a step whose loss exceeds `factor` x the mean of the last `window` accepted losses.

    The decision is taken on the global loss (the same on every rank) after backward and
    before the optimizer step, so a skipped batch never touches weights or optimizer state.
    The guard only judges once `min_history` losses are known, since early losses fall fast."""

    def __init__(self, factor: float, max_skips: int, window: int = 20, min_history: int = 5):
        self.factor, self.max_skips, self.min_history = factor, max_skips, min_history
        self.history = collections.deque(maxlen=window)
        self.skips_in_a_row = 0

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def running_mean(self) -> float:
        return sum(self.history) / len(self.history)

    def should_skip(self, loss: float, step: int) -> bool:
        """True to skip this step's update; raises TrainingStopped after max_skips in a row."""
        if not self.enabled:
            return False
        spike = not math.isfinite(loss) or (len(self.history) >= self.min_history and loss > self.factor * self.running_mean())
        if not spike:
            self.history.append(loss)
            self.skips_in_a_row = 0
            return False
        self.skips_in_a_row += 1
        if self.skips_in_a_row >= self.max_skips:
            mean = self.running_mean() if self.history else float("nan")
            raise TrainingStopped(
                f"train.spike_factor: stopped at step {step} after {self.skips_in_a_row} steps in a row whose loss "
                f"exceeded {self.factor} x the running mean {mean:.4f} (last loss {loss:.4f}); lower train.lr or "
                f"check the data around this step")
        return True


class EarlyStopper:
    """Stop when validation loss has not reached a new best for `patience` evaluations."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.evaluations_without_gain = 0

    def should_stop(self, val_loss: float) -> bool:
        if not self.patience:
            return False
        if val_loss < self.best:
            self.best, self.evaluations_without_gain = val_loss, 0
            return False
        self.evaluations_without_gain += 1
        return self.evaluations_without_gain >= self.patience

"""Learning-rate schedules: linear warm-up, then cosine / linear / constant / WSD decay."""
from __future__ import annotations

import math


def lr_at(step: float, *, lr: float, min_lr: float, warmup: int, decay_iters: int, schedule: str,
          wsd_decay_fraction: float = 0.1) -> float:
    """Learning rate for 0-based `step`. Warm-up ramps linearly so step 0 is already > 0."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if step >= decay_iters:
        return min_lr
    if schedule == "wsd":
        decay_start = decay_iters - int(round(wsd_decay_fraction * decay_iters))
        if step < max(decay_start, warmup):
            return lr
        progress = (step - max(decay_start, warmup)) / max(1, decay_iters - max(decay_start, warmup))
        return min_lr + (lr - min_lr) * (1.0 - progress)
    progress = (step - warmup) / max(1, decay_iters - warmup)
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets each param group's lr from the schedule. The schedule's position counts the samples
    of the updates taken so far in units of the full global batch: without a batch ramp that is
    the number of updates; while `train.batch_ramp` runs smaller batches, each advances it by its
    share (Megatron's sample-based schedule), so warm-up and decay span the same samples with or
    without a ramp. A step skipped by the spike guard takes no update and does not advance it."""

    def __init__(self, optimizer, train_cfg):
        self.optimizer, self.cfg, self.step_index, self.samples = optimizer, train_cfg, 0, 0

    def position(self) -> float:
        return self.samples / self.cfg.global_batch_size if self.cfg.global_batch_size else float(self.step_index)

    def current(self) -> float:
        c = self.cfg
        return lr_at(self.position(), lr=c.lr, min_lr=c.min_lr, warmup=c.warmup_iters,
                     decay_iters=c.decay_iters or c.iters, schedule=c.lr_schedule,
                     wsd_decay_fraction=c.wsd_decay_fraction)

    def apply(self) -> float:
        lr = self.current()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self, samples: int | None = None) -> None:
        """One update made of `samples` samples (default: a full global batch)."""
        self.step_index += 1
        self.samples += self.cfg.global_batch_size if samples is None else samples

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])
        self.samples = int(state.get("samples", self.step_index * self.cfg.global_batch_size))  # older checkpoints

"""Dynamic loss scaling for fp16 training (Megatron's rules).

fp16 gradients underflow unless the loss is multiplied by a large scale before backward. A step
whose (unscaled) gradients hold inf/nan is skipped; after `hysteresis` such steps since the last
growth the scale is multiplied by `backoff_factor`; after `growth_interval` clean steps in a row
it is multiplied by `growth_factor` (and the hysteresis budget refills). The state is three
numbers and goes into the checkpoint, so a resumed run scales exactly as an uninterrupted one.
"""
from __future__ import annotations


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0**16, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.scale, self.min_scale = float(initial_scale), float(min_scale)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.clean_steps = 0  # consecutive steps without overflow
        self.hysteresis_left = hysteresis
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.skipped_steps += 1
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

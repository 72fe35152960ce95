"""Per-step metrics to the console, `<output_dir>/metrics.jsonl` and optionally TensorBoard.

MFU = achieved model FLOP/s per GPU / peak. Model FLOPs per token are
6 x matmul parameters + 12 x layers x hidden x seq (ModelConfig.flops_per_token); the peak is
989 TFLOP/s dense bf16 for H100 and H200 (the SXM datasheet value), overridable with
`log.peak_tflops`; on devices of unknown peak (CPU) MFU is reported as null.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

PEAK_TFLOPS_BY_NAME = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def device_peak_tflops(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_BY_NAME.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, quiet: bool = False, tensorboard: bool = False):
        self.enabled, self.quiet = enabled, quiet
        self.jsonl = None
        self.tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
                except ImportError:
                    print("warning: tensorboard is not installed; log.tensorboard ignored", file=sys.stderr)

    def log(self, record: dict, console_keys=None, to_console: bool = True) -> None:
        """Every record goes to metrics.jsonl (and TensorBoard); the console gets it when asked."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record.get("step", 0))
        if to_console and not self.quiet:
            keys = console_keys or record.keys()
            print(" | ".join(_format(k, record[k]) for k in keys if k in record), flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _format(key, value) -> str:
    if value is None:
        return f"{key} -"
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:.0f}"
    return f"{key} {value}"


class Throughput:
    """Tokens/s and MFU of the last step."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak_tflops):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak = world_size, peak_tflops
        self.start = time.perf_counter()

    def lap(self, tokens: int | None = None) -> tuple:
        """(seconds, tokens/s, MFU) since the last lap; `tokens` when this step's batch differs
        from the configured one (batch ramp-up)."""
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        tokens_per_s = (self.tokens_per_step if tokens is None else tokens) / elapsed
        mfu = None
        if self.peak:
            mfu = tokens_per_s * self.flops_per_token / (self.world_size * self.peak * 1e12)
        return elapsed, tokens_per_s, mfu

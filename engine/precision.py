"""Numeric precision of a run (`train.precision`).

- `fp32`: fp32 weights and math.
- `bf16-autocast`: fp32 weights, matmuls under bf16 autocast, fp32 optimizer (no master copy).
- `bf16`: Megatron-style mixed precision: bf16 weights, gradients accumulated in an fp32
  `main_grad` buffer, fp32 master weights in the optimizer (copied back after each step).
- `fp16`: as `bf16` with fp16 weights plus dynamic loss scaling.
- `fp8`: as `bf16`, with the transformer layers' linears computing in FP8 (parallel/fp8.py;
  recipe from `train.fp8_format`, `train.fp8_scaling`, `train.fp8_amax_history`); the output
  layer stays bf16.
- `auto`: `bf16` on GPU, `fp32` on CPU.

Autocast stays on for bf16/fp16 weights too: it keeps ops that create fp32 tensors (RoPE
tables, position ids) from mixing dtypes with the half-precision weights.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "fp16", "fp8")
FP8_BACKENDS = ("auto", "te", "trellis")  # whose FP8 linears (train.fp8_backend; parallel/te_fp8.py)
_COMPUTE_DTYPE = {"bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the model weights (the optimizer's masters are always fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(precision, torch.float32)


def autocast_context(precision: str, device: torch.device):
    """A factory of the context each forward pass runs under."""
    dtype = _COMPUTE_DTYPE.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)

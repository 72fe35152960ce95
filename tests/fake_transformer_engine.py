"""A CPU stand-in for the parts of Transformer Engine that parallel/te_fp8.py calls, with TE's
calling conventions as its 2.20 source has them (read from transformer_engine/pytorch/module/
linear.py) and exact matmuls:

- `Linear(in, out, bias=False, params_dtype, device)` owns a `weight` Parameter; `forward(inp,
  is_first_microbatch)` must run inside `autocast` (the recipe is recorded per call);
- with `fuse_wgrad_accumulation` the backward writes the fp32 weight gradient into
  `weight.main_grad`, *overwriting* it on a first micro-batch and adding otherwise; where the
  weight has a `grad_added_to_main_grad` attribute it sets it and returns a placeholder gradient,
  else it returns None;
- `is_fp8_available()` returns (bool, reason); the recipes are `Format` and
  `Float8CurrentScaling` (the only one Trellis maps to).
The real library is checked on a GPU in tests/gpu/test_te_fp8_gpu.py.
"""
from __future__ import annotations

import contextlib
import enum
import sys
import types

import torch


class Format(enum.Enum):
    E4M3 = "e4m3"
    HYBRID = "hybrid"


class _Recipe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Float8CurrentScaling(_Recipe):
    pass


class _State:
    recipe = None
    calls: list = []  # (id of the weight, is_first_microbatch, the recipe in force)


@contextlib.contextmanager
def autocast(enabled=True, recipe=None):
    previous, _State.recipe = _State.recipe, recipe if enabled else None
    try:
        yield
    finally:
        _State.recipe = previous


def is_fp8_available():
    return True, ""


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, fuse_wgrad, is_first):
        ctx.save_for_backward(inp, weight)
        ctx.fuse_wgrad, ctx.is_first = fuse_wgrad, is_first
        return inp @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        inp, weight = ctx.saved_tensors
        grad_in = grad @ weight
        wgrad = grad.reshape(-1, grad.shape[-1]).float().t() @ inp.reshape(-1, inp.shape[-1]).float()
        if not ctx.fuse_wgrad:
            return grad_in, wgrad.to(weight.dtype), None, None
        if ctx.is_first:
            weight.main_grad.copy_(wgrad)
        else:
            weight.main_grad.add_(wgrad)
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            return grad_in, torch.empty_like(weight), None, None
        return grad_in, None, None, None


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda"):
        super().__init__()
        assert not bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.fuse_wgrad_accumulation = False

    def forward(self, inp, is_first_microbatch=None):
        assert _State.recipe is not None, "te.Linear called outside autocast: it would not compute in FP8"
        _State.calls.append((id(self.weight), is_first_microbatch, _State.recipe))
        return _Matmul.apply(inp, self.weight, self.fuse_wgrad_accumulation, is_first_microbatch)


def install() -> None:
    """Make `import transformer_engine.pytorch` and `.common.recipe` find this stand-in."""
    root, pytorch, common, recipe = (types.ModuleType(name) for name in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
        "transformer_engine.common.recipe"))
    for name in ("Linear", "autocast", "is_fp8_available"):
        setattr(pytorch, name, globals()[name])
    for name in ("Format", "Float8CurrentScaling"):
        setattr(recipe, name, globals()[name])
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    sys.modules.update({"transformer_engine": root, "transformer_engine.pytorch": pytorch,
                        "transformer_engine.common": common, "transformer_engine.common.recipe": recipe})

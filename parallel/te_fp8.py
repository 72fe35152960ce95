"""FP8 linears through Transformer Engine, when it is installed (`train.fp8_backend`).

Trellis keeps its own layers: their weights, their tensor- and sequence-parallel
communication, their checkpoints. Only the matmul changes hands. Each linear's `linear_fn`
runs a `te.Linear` whose weight *is* the layer's Parameter (the TE module is built on the meta
device and handed that Parameter, so it allocates nothing), under TE's FP8 autocast with the
recipe that matches `train.fp8_format`, `train.fp8_scaling` and `train.fp8_amax_history`:

- tensor scaling, history 1: `Float8CurrentScaling` (each tensor scaled by its own amax, as
  Trellis's own path does);
- an amax history (`train.fp8_amax_history` above 1) or row scaling: no TE recipe here, so
  `auto` keeps Trellis's path and `te` says why. TE's delayed scaling updates its histories
  when an outermost autocast exits, and all-reduces the amaxes first over the autocast's group
  (the whole world when none is given). Entered per linear, as here, that is a world
  all-reduce per linear call, which pipeline stages (each running its own layers) would not
  match; a recomputed forward would update the histories again; and they would need a
  checkpoint format of their own. Trellis's path keeps a history per tensor without any of it.
  Row scaling has no TE counterpart (TE's block scaling is another scheme).

The TE module is kept out of the layer's submodules, so parameter names, checkpoints and the
optimizer see the layer as before. Current scaling keeps no state between calls, so there is no
TE state to checkpoint.

Weight gradients go into the fp32 `main_grad` as with the other linears: TE's
`fuse_wgrad_accumulation`, which marks the weight `grad_added_to_main_grad` and returns a
placeholder gradient (parallel/main_grad_linear.take_filled_flag reads either mark). Weights are
quantised once per optimizer step through TE's `is_first_microbatch`. TE then *writes* rather
than adds the first micro-batch's weight gradient, which is right here because the gradient
buffer is zeroed before each step and a step's first forward is its first backward (pipeline
schedules run backwards in forward order).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from parallel import fp8
from parallel.te_import import import_te


def unusable_reason(recipe: fp8.FP8Recipe, device: torch.device, compile_layers: bool = False,
                    cuda_graphs: bool = False) -> Optional[str]:
    """Why Transformer Engine cannot run this run's FP8 linears, or None when it can."""
    modules, error = import_te()
    if modules is None:
        return f"transformer_engine cannot be imported ({error})"
    te, te_recipe = modules
    if device.type != "cuda":
        return "Transformer Engine runs on CUDA only"
    available = te.is_fp8_available()
    ok, why = available if isinstance(available, tuple) else (available, "")
    if not ok:
        return f"Transformer Engine reports no FP8 on this device ({why})"
    if recipe.rowwise:
        return "train.fp8_scaling row has no Transformer Engine recipe (use tensor, or train.fp8_backend trellis)"
    if recipe.amax_history > 1:
        return ("train.fp8_amax_history above 1 would be Transformer Engine's delayed scaling, whose amax "
                "all-reduce at each autocast exit does not fit Trellis's per-linear autocast (use 1, or "
                "train.fp8_backend trellis)")
    if not hasattr(te_recipe, "Float8CurrentScaling"):
        return "this Transformer Engine has no current-scaling recipe (Float8CurrentScaling; TE 2.2 or later)"
    if compile_layers:
        return "model.compile traces Trellis's own FP8 path, not Transformer Engine's modules"
    if cuda_graphs:
        return "model.cuda_graphs captures Trellis's own FP8 path, not Transformer Engine's modules"
    return None


def resolve_backend(requested: str, recipe: fp8.FP8Recipe, device: torch.device, compile_layers: bool = False,
                    cuda_graphs: bool = False) -> str:
    """`te` or `trellis`: auto takes Transformer Engine where it can run the recipe."""
    if requested == "trellis":
        return "trellis"
    reason = unusable_reason(recipe, device, compile_layers, cuda_graphs)
    if reason is None:
        return "te"
    if requested == "te":
        raise RuntimeError(f"train.fp8_backend is te, but {reason}")
    return "trellis"


def te_recipe(recipe: fp8.FP8Recipe):
    """The Transformer Engine recipe of a Trellis FP8Recipe: current tensor scaling only (see
    the module's docstring for why not an amax history)."""
    if recipe.rowwise or recipe.amax_history > 1:
        raise ValueError(f"no Transformer Engine recipe for {recipe} in Trellis's per-linear autocast")
    te_recipe_module = import_te()[0][1]
    fmt = te_recipe_module.Format.E4M3 if recipe.grad_dtype == fp8.E4M3 else te_recipe_module.Format.HYBRID
    return te_recipe_module.Float8CurrentScaling(fp8_format=fmt)


def _autocast(te, recipe):
    """TE's FP8 autocast: `autocast` in TE 2.8 and later, `fp8_autocast` before."""
    if hasattr(te, "autocast"):
        return functools.partial(te.autocast, enabled=True, recipe=recipe)
    return functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=recipe)


def _te_module(te, weight: torch.Tensor):
    """A te.Linear for weights of this shape, built on the meta device (no allocation, no init):
    each call hands it the weight to compute with."""
    out_features, in_features = weight.shape
    return te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype, device="meta")


def _into_main_grad(weight: torch.Tensor) -> bool:
    """Whether TE should accumulate the weight gradient into main_grad itself: its GEMM writes
    fp32 from FP8 operands, so an fp32 main_grad is all it needs."""
    main_grad = getattr(weight, "main_grad", None)
    return weight.requires_grad and main_grad is not None and main_grad.dtype == torch.float32


def te_linear_fn(recipe: fp8.FP8Recipe = fp8.FP8Recipe()):
    """A drop-in for F.linear(x, weight, bias) computing through Transformer Engine's FP8."""
    te = import_te()[0][0]
    autocast = _autocast(te, te_recipe(recipe))
    trellis_fp8 = fp8.fp8_linear_fn(recipe)
    state = {"module": None, "quantised": None}  # the te.Linear; what its FP8 weight copy is of

    def first_use_this_step(weight) -> Optional[bool]:
        """TE's is_first_microbatch: True where the weight's FP8 copy must be made (a new step, a
        new weight or an in-place write), False to reuse it; None (quantise every call) where
        Trellis's own path would not cache it either (frozen weights, graph capture, compiling)."""
        key = (fp8.weight_generation(), id(weight), weight._version) if fp8.may_cache(weight) else None
        first = None if key is None else state["quantised"] != key
        state["quantised"] = key
        return first

    def linear(x, weight, bias=None):
        if not fp8.fp8_shapes(x, weight):
            return F.linear(x, weight, bias)
        if not isinstance(weight, torch.nn.Parameter) and weight.requires_grad:
            return trellis_fp8(x, weight, bias)  # a computed weight: TE would cut its autograd history
        module = state["module"]
        if module is None or module.weight.shape != weight.shape or module.weight.dtype != weight.dtype:
            module = state["module"] = _te_module(te, weight)
        if module.weight is not weight:  # TE computes with the layer's own Parameter
            module.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        module.fuse_wgrad_accumulation = _into_main_grad(weight)
        if module.fuse_wgrad_accumulation and not hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = False  # present, so TE marks it rather than returning no gradient
        with autocast():
            y = module(x, is_first_microbatch=first_use_this_step(weight))
        return y if bias is None else y + bias.to(y.dtype)

    linear.fp8_recipe = recipe
    linear.fp8_backend = "te"
    return linear


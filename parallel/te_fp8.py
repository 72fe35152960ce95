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

import contextlib
import ctypes
import functools
import glob
import importlib.util
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from parallel import fp8


def _load_torchs_cudnn() -> Optional[str]:
    """Load every library of torch's own cuDNN (globally) before TE imports. TE's loader takes a
    system cuDNN where it finds one, and its core library links cuDNN's sub-libraries by name. A
    system cuDNN of another version then either wins the names torch loads later (torch refuses
    it: "cuDNN version incompatibility") or fills only some of them and fails to link against
    torch's copy (undefined symbols), as on the H200 machines here (system 9.14, torch 9.19).
    Returns their folder, for TE's loader (None where torch has no cuDNN loaded)."""
    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available() or not os.path.exists("/proc/self/maps"):
        return None
    torch.backends.cudnn.version()  # loads it
    with open("/proc/self/maps") as maps:
        path = next((line.split()[-1] for line in maps if "/libcudnn.so" in line), None)
    if path is None:
        return None
    folder = os.path.dirname(path)
    for library in sorted(glob.glob(os.path.join(folder, "libcudnn*.so*"))):
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # a sub-library this machine cannot load; cuDNN loads the ones it needs itself
    return folder


@contextlib.contextmanager
def _cudnn_home(folder: Optional[str]):
    """CUDNN_HOME (where TE's loader looks first) set to `folder` while TE imports, and only then.
    torch's extension builder reads the variable too, once, as it is first imported, and adds its
    paths to every build command: left set, it changed the commands of Trellis's cached kernels,
    so each process that imported TE rebuilt them all (minutes), and the next one without TE
    rebuilt them back. The builder is imported before the variable is set."""
    import torch.utils.cpp_extension  # noqa: F401  (reads CUDNN_HOME now, unset)

    if folder is None or "CUDNN_HOME" in os.environ:
        yield
        return
    os.environ["CUDNN_HOME"] = folder
    try:
        yield
    finally:
        del os.environ["CUDNN_HOME"]


@functools.lru_cache(maxsize=None)
def import_te() -> tuple:
    """((transformer_engine.pytorch, transformer_engine.common.recipe) or None, why not)."""
    if "transformer_engine" not in sys.modules and importlib.util.find_spec("transformer_engine") is None:
        return None, "not installed"  # (and torch's cuDNN is left to load as it would)
    try:
        with _cudnn_home(_load_torchs_cudnn()):
            import transformer_engine.pytorch as te
            from transformer_engine.common import recipe
    except Exception as error:  # ImportError, or its CUDA libraries failing to load as it imports
        return None, f"{type(error).__name__}: {error}"
    return (te, recipe), ""


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


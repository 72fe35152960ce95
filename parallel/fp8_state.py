"""Which linears of a model compute in FP8, and the state they keep: the amax histories of
Trellis's FP8 linears (`train.fp8_amax_history` above 1), which checkpoints save and restore
(engine/checkpoint.py). Kept apart from parallel/fp8.py so that reading a model's FP8 state
does not load the CUDA kernels."""
from __future__ import annotations

import torch


def fp8_linears(module: torch.nn.Module) -> list:
    """(name, layer, FP8 linear fn) for each linear under `module` that computes through an FP8
    linear_fn: its own, or the base of a wrapper such as LoRA's, which keeps it in `base_fn`."""
    found = []
    for name, layer in module.named_modules():
        fn = getattr(layer, "linear_fn", None)
        while fn is not None and getattr(fn, "fp8_recipe", None) is None:
            fn = getattr(fn, "base_fn", None)
        if fn is not None:
            found.append((name, layer, fn))
    return found


def uses_fp8(module: torch.nn.Module) -> bool:
    return bool(fp8_linears(module))


def amax_histories(module: torch.nn.Module) -> dict:
    """Every amax history under `module`, as "layer name.tensor key" -> its [length] tensor
    (empty for current scaling, and before the first forward)."""
    return {f"{name}.{key}": past for name, _, fn in fp8_linears(module) if hasattr(fn, "amax_state")
            for key, past in fn.amax_state.history.items()}


def amax_history_length(module: torch.nn.Module) -> int:
    """How many amaxes each FP8 linear under `module` keeps (0 without Trellis's FP8 linears)."""
    return max((fn.amax_state.length for _, _, fn in fp8_linears(module) if hasattr(fn, "amax_state")), default=0)


def load_amax_histories(module: torch.nn.Module, saved: dict) -> int:
    """Put histories saved by amax_histories back into `module`'s FP8 linears; returns how many
    were taken. A saved name with no FP8 linear of that name here is an error."""
    taken = 0
    for name, layer, fn in fp8_linears(module):
        mine = {key[len(name) + 1:]: values for key, values in saved.items() if key.rpartition(".")[0] == name}
        if mine and hasattr(fn, "amax_state"):
            fn.amax_state.load(mine, layer.weight.device)
            taken += len(mine)
    if taken != len(saved):
        raise ValueError(f"{len(saved) - taken} saved amax histories name no FP8 linear of this model")
    return taken

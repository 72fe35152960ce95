"""Fold the LoRA adapters of a Trellis checkpoint into its base weights.

    python tools/merge_lora.py --ckpt RUN_DIR [--step N] [--base BASE_DIR] --out DIR

Reads a checkpoint saved by a `--finetune.method lora` or `qlora` run (any TP/PP/DP layout:
keys are global) and the base model it was trained on (such checkpoints hold only the adapters;
the base is the run's `finetune.base` unless `--base` names it), computes W + scale * B A for
every adapted weight in full precision, block by block for fused weights (a B stored as `.q` /
`.v` only touches the q and v blocks), and writes a model-only checkpoint (step 0) without
adapters. A QLoRA run's adapters are merged into the full-precision base, not its NF4 copy. Train or evaluate from it with `--checkpoint.load DIR`
(no finetune section), or export it with `tools/convert_checkpoint.py trellis-to-hf`.
Tensors are read and written one at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.checkpoint import (  # noqa: E402
    FORMAT, LATEST_FILE, META_FILE, CheckpointError, architecture, read_meta, resolve_step_dir, step_dir_name,
    stored_shapes, write_atomically)
from tools.convert_checkpoint import LazySavePlanner, read_trellis_tensor  # noqa: E402

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def lora_scale_of(meta: dict) -> float:
    """The run's alpha / r (or alpha / sqrt(r) for rsLoRA), from the config it saved."""
    finetune = meta.get("config", {}).get("finetune", {})
    if finetune.get("method") not in ("lora", "qlora"):
        raise CheckpointError("the checkpoint was not saved by a finetune.method lora or qlora run")
    rank, alpha = finetune["lora_rank"], finetune["lora_alpha"]
    return alpha / math.sqrt(rank) if finetune.get("lora_rslora") else alpha / rank


def adapter_of(key: str, shapes: dict):
    """For a base weight key (`model.X.weight` or `model.X.weight.<block>`), the keys of the A
    and B that update it, or None when it has no adapter (or its block is not targeted)."""
    module, _, rest = key.partition(".weight")
    if rest and not rest.startswith("."):
        return None
    a_key, b_key = module + ".lora_A", module + ".lora_B" + rest
    if a_key in shapes and b_key in shapes:
        return a_key, b_key
    return None


def base_step_dir(step_dir: str, meta: dict, base: str) -> str:
    """Where the base weights are: in the checkpoint itself (older LoRA checkpoints held them),
    else `base` or the run's finetune.base."""
    if not meta.get("trainable_only"):
        return step_dir
    base = base or meta.get("config", {}).get("finetune", {}).get("base", "")
    if not base:
        raise CheckpointError(f"{step_dir} holds only adapters and its run had no finetune.base (a random base); "
                              "give the base model with --base")
    base_dir = resolve_step_dir(base, -1)
    if architecture(read_meta(base_dir)["model"]) != architecture(meta["model"]):
        raise CheckpointError(f"base {base_dir} is a different model from the one {step_dir} was trained on")
    return base_dir


def merged_tensor(base: tuple, adapters: tuple, key: str, scale: float) -> torch.Tensor:
    """Base weight `key` plus its adapter's update; base and adapters are (step dir, shapes)."""
    (base_dir, base_shapes), (step_dir, shapes) = base, adapters
    weight = read_trellis_tensor(base_dir, key, base_shapes[key])
    adapter = adapter_of(key, shapes)
    if adapter is None:
        return weight
    a, b = (read_trellis_tensor(step_dir, k, shapes[k]) for k in adapter)
    return weight + scale * (b @ a)


def merge_checkpoint(ckpt: str, out: str, step: int = -1, base: str = "") -> str:
    """Write the merged model-only checkpoint under `out`; returns its step directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    start = time.perf_counter()
    step_dir = resolve_step_dir(ckpt, step)
    meta = read_meta(step_dir)
    scale = lora_scale_of(meta)
    shapes = stored_shapes(step_dir)
    base_dir = base_step_dir(step_dir, meta, base)
    base_shapes = stored_shapes(base_dir)
    model_keys = [k for k in base_shapes if k.startswith("model.") and ".lora_" not in k]
    merged = [k for k in model_keys if adapter_of(k, shapes)]
    if not merged:
        raise CheckpointError(f"{step_dir} holds no LoRA adapters to merge")
    placeholders = {k: torch.empty(base_shapes[k], dtype=torch.float32, device="meta") for k in model_keys}
    planner = LazySavePlanner(lambda key: merged_tensor((base_dir, base_shapes), (step_dir, shapes), key, scale))
    target = os.path.join(out, step_dir_name(0))
    tmp = os.path.join(out, ".tmp_" + step_dir_name(0))
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save(placeholders, storage_writer=FileSystemWriter(tmp, thread_count=1), planner=planner, no_dist=True)
    out_meta = {"format": FORMAT, "version": 1, "step": 0, "contents": ["model"], "layout": None,
                "padded_vocab": meta["padded_vocab"], "model": meta["model"],
                "merged_from": os.path.abspath(step_dir), "base": os.path.abspath(base_dir), "lora_scale": scale,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for key in ("hf_family", "hf_dtype"):
        if key in meta:
            out_meta[key] = meta[key]
    write_atomically(os.path.join(tmp, META_FILE), json.dumps(out_meta, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    write_atomically(os.path.join(out, LATEST_FILE), step_dir_name(0) + "\n")
    print(f"merged {len(merged)} adapted weight(s) (scale {scale:g}) into {target} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint root (or one step's directory) of a LoRA run")
    parser.add_argument("--step", type=int, default=-1, help="step to merge (default: the latest)")
    parser.add_argument("--base", default="", help="base model checkpoint (default: the run's finetune.base)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        merge_checkpoint(args.ckpt, args.out, args.step, args.base)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

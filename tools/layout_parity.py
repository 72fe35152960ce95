"""Check that a parallel layout trains like one GPU: same losses, grad norms and final weights.

Train the same model and data once per layout, then compare every run with the single-GPU one:

    torchrun --nproc-per-node 1 tools/layout_parity.py run --out runs/parity/ref.json --init runs/parity/init.pt ARGS
    torchrun --nproc-per-node 1 tools/layout_parity.py run --out runs/parity/fp32.json ARGS --train.precision fp32
    torchrun --nproc-per-node 2 tools/layout_parity.py run --out runs/parity/tp2.json ARGS --parallel.tp 2
    python tools/layout_parity.py compare runs/parity/ref.json runs/parity/fp32.json runs/parity/tp2.json ...

ARGS are the usual `--section.key value` training arguments, the same for every run. `run` saves
the per-step loss and grad norm (JSON) and the final full weights gathered over TP and PP
(`<out>.pt`, written by rank 0); `--init` also saves the weights before the first step.

`compare` takes the reference run first and the precision yardstick second: the same
single-GPU run in fp32. How far bf16 lands from fp32 is the rounding noise of bf16 itself, so a
layout is within bf16 tolerance when it deviates from the single-GPU bf16 run by no more than
that (with a 2x margin, as both are samples of the same noise), in:
- the first step's loss and grad norm: every layout's whole forward and backward on the same
  weights and the same batch (differences under 1e-3 relative always pass: rounding);
- the final weights, as |w - w_ref| / |w_ref - w_init| over the whole model (the deviation
  relative to what training moved), where the runs kept them.
The largest loss difference over all steps is shown too but not judged: from-scratch runs spike
early, and a spike turns rounding noise into loss differences of a whole nat (fp32 against bf16
too), so a single curve is not a stable measure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARGIN = 2.0  # a layout may deviate up to MARGIN x the bf16-vs-fp32 deviation
# The first step's fp32-vs-bf16 gap is a single sample of rounding noise and can come out
# tiny; below a quarter of bf16's relative spacing (2^-8) a first-step difference is rounding
# whatever that sample says. (Interleaved PP's message mix-up moved the first loss by 5e-3
# relative, and its gradient norm by 1e7.)
FIRST_STEP_FLOOR = 1e-3


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    run = modes.add_parser("run", help="train one layout (under torchrun) and save its results")
    run.add_argument("--out", required=True, help="JSON of per-step losses; weights go beside it as .pt")
    run.add_argument("--init", default="", help="also save the weights before training here")
    compare = modes.add_parser("compare", help="compare runs with the reference (first) and fp32 (second) run")
    compare.add_argument("runs", nargs="+", help="JSON files: reference, fp32 yardstick, then the layouts")
    compare.add_argument("--init", required=True, help="the weights saved before training by `run --init`")
    compare.add_argument("--out", default="", help="also write the table rows as JSON here")
    return parser.parse_known_args(argv)


def layout_name(cfg, world_size: int) -> str:
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    parts = [f"TP={p.tp}" + (" SP" if p.sp else ""), f"PP={p.pp}" + (f" vpp={p.vpp}" if p.vpp > 1 else ""), f"DP={dp}"]
    if cfg.optim.shard:
        parts.append("sharded optimizer")
    return " x ".join(part for part in parts if not part.endswith("=1")) or "1 GPU"


def run_layout(args, extra) -> None:
    import torch

    from engine.config import parse_args, validate
    from engine.training import gather_model_state, shutdown, trainer_class

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = validate(parse_args(extra), world_size)
    trainer = trainer_class(cfg.train.objective)(cfg)
    rank0 = trainer.grid.rank == 0
    if args.init:
        init = gather_model_state(trainer.model_chunks, trainer.grid)
        if rank0:
            torch.save({k: v.cpu() for k, v in init.items()}, args.init)
        del init
    history = trainer.train()
    weights = gather_model_state(trainer.model_chunks, trainer.grid)
    if rank0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save({k: v.cpu() for k, v in weights.items()}, weights_path(args.out))
        result = {"layout": layout_name(cfg, world_size), "world_size": world_size, "precision": cfg.train.precision,
                  "loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
                  "args": " ".join(extra)}
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
        final = f"final loss {result['loss'][-1]:.4f}" if history else "no steps left to train"
        print(f"{result['layout']}: {final} after {len(history)} steps")
    shutdown()


def weights_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".pt"


def relative_weight_deviation(weights: dict, reference: dict, init: dict) -> float:
    """|w - w_ref| / |w_ref - w_init| over all parameters (float64 sums of float32 terms)."""
    import torch

    if weights.keys() != reference.keys():
        missing = sorted(set(reference) ^ set(weights))[:5]
        raise SystemExit(f"error: the runs hold different parameters ({missing} ...)")
    diff = moved = 0.0
    for name, ref in reference.items():
        ref32 = ref.float()
        diff += (weights[name].float() - ref32).square().sum(dtype=torch.float64).item()
        moved += (ref32 - init[name].float()).square().sum(dtype=torch.float64).item()
    return math.sqrt(diff) / max(math.sqrt(moved), 1e-30)


JUDGED = ("first_loss_diff", "first_grad_norm_rel_diff", "weight_deviation")


def curve_deviation(run: dict, reference: dict) -> dict:
    """First-step loss and grad-norm differences, and the largest loss difference of any step."""
    if len(run["loss"]) != len(reference["loss"]):
        raise SystemExit(f"error: {run['layout']} ran {len(run['loss'])} steps, the reference {len(reference['loss'])}")
    return {"first_loss_diff": abs(run["loss"][0] - reference["loss"][0]),
            "first_grad_norm_rel_diff": abs(run["grad_norm"][0] - reference["grad_norm"][0]) / reference["grad_norm"][0],
            "max_loss_diff": max(abs(a - b) for a, b in zip(run["loss"], reference["loss"]))}


def load_weights(path: str, device: str | None = None):
    """A saved weights file, or None where the run kept none; on the GPU when there is one (a
    1.3B model's comparison takes minutes on a CPU)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.load(path, map_location=device) if os.path.exists(path) else None


def compare_runs(paths: list, init_weights: str) -> list:
    """One row per run after the reference; the fp32 row is the yardstick of the rest."""
    if len(paths) < 2:
        raise SystemExit("error: compare needs the reference run and the fp32 run, then the layouts")
    runs = []
    for path in paths:
        with open(path) as handle:
            runs.append(json.load(handle))
    init, reference_weights = load_weights(init_weights), load_weights(weights_path(paths[0]))
    rows = []
    for path, run in zip(paths[1:], runs[1:]):
        row = {"layout": run["layout"], "precision": run["precision"], **curve_deviation(run, runs[0])}
        weights = load_weights(weights_path(path)) if init is not None and reference_weights is not None else None
        row["weight_deviation"] = None if weights is None else relative_weight_deviation(weights, reference_weights, init)
        rows.append(row)
    yardstick, first_loss = rows[0], abs(runs[0]["loss"][0])
    floors = {"first_loss_diff": FIRST_STEP_FLOOR * first_loss, "first_grad_norm_rel_diff": FIRST_STEP_FLOOR,
              "weight_deviation": 0.0}
    for row in rows[1:]:
        judged = [k for k in JUDGED if row[k] is not None and yardstick[k] is not None]
        row["within_tolerance"] = all(row[k] <= max(MARGIN * yardstick[k], floors[k]) for k in judged)
    return rows


def compare_reloads(saved_weights: str, reloads: list) -> list:
    """Each reload run (`run --init` after `--checkpoint.load`, one more step) against the run
    that saved the checkpoint: the weights it loaded must be those saved, bit for bit; the loss
    of its next step is returned so the reloads can be compared with each other."""
    saved = load_weights(saved_weights)
    rows = []
    for path in reloads:
        with open(path) as handle:
            run = json.load(handle)
        loaded = load_weights(init_path(path))
        if loaded is None or loaded.keys() != saved.keys():
            raise SystemExit(f"error: {path} loaded other parameters than were saved")
        worst = max((loaded[name].float() - saved[name].float()).abs().max().item() for name in saved)
        rows.append({"layout": run["layout"], "max_abs_weight_diff": worst, "next_loss": run["loss"][-1],
                     "identical": worst == 0.0})
    return rows


def init_path(json_path: str) -> str:
    """Where multi_gpu_runs keeps a reload run's weights as loaded (its --init)."""
    return os.path.splitext(json_path)[0] + "_loaded.pt"


def format_reloads(rows: list, saved_layout: str) -> str:
    lines = [f"checkpoint saved at {saved_layout}, reloaded:", "",
             "| loaded at | max abs weight diff | identical | loss of the next step |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['layout']} | {row['max_abs_weight_diff']:.1e} | {'yes' if row['identical'] else 'NO'} | "
                     f"{row['next_loss']:.5f} |")
    return "\n".join(lines) + "\n"


def format_table(rows: list, reference: dict) -> str:
    lines = [f"reference: {reference['layout']} ({reference['precision']}), loss {reference['loss'][0]:.4f} -> "
             f"{reference['loss'][-1]:.4f} over {len(reference['loss'])} steps", "",
             "| run | step-1 loss diff | step-1 grad-norm rel diff | final weight deviation | "
             "max loss diff, any step | within tolerance |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        verdict = {True: "yes", False: "NO"}.get(row.get("within_tolerance"), "(yardstick)")
        weights = "not kept" if row["weight_deviation"] is None else f"{row['weight_deviation']:.2e}"
        lines.append(f"| {row['layout']} {row['precision']} | {row['first_loss_diff']:.1e} | "
                     f"{row['first_grad_norm_rel_diff']:.1e} | {weights} | {row['max_loss_diff']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    if args.mode == "run":
        run_layout(args, extra)
        return 0
    if extra:
        raise SystemExit(f"error: compare takes no training arguments: {' '.join(extra)}")
    rows = compare_runs(args.runs, args.init)
    with open(args.runs[0]) as handle:
        print(format_table(rows, json.load(handle)), end="")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(row.get("within_tolerance", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

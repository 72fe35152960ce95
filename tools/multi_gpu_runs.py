"""The multi-GPU runs of docs/benchmarks.md: layout parity against one GPU, and scaling.

    python tools/multi_gpu_runs.py parity  --gpus 4 --out runs/multi_gpu
    python tools/multi_gpu_runs.py scaling --gpus 4 --out runs/multi_gpu [--only dp,tp4_sp]
    python tools/multi_gpu_runs.py sweep   --gpus 8 --out runs/multi_gpu [--preset llama3-8b --seq 4096]

`parity` trains llama-1.3b (bf16) for 20 steps on real text (examples/prepare_text_data.py)
with a 10-step warm-up (a faster one makes the loss spike, and a spiking run amplifies any
rounding difference): on one GPU, once more in fp32 as the precision yardstick, and at every
TP/SP/PP/DP layout that fits in --gpus, then compares them with tools/layout_parity.py (table
in <out>/parity.md). Runs that fit side by side on free GPUs run at the same time. On 8 GPUs
the TP=2 x PP=2 x DP=2 run saves a checkpoint that is reloaded at TP=4 x PP=2 and on one GPU:
the weights must arrive bit for bit.

`scaling` runs tools/benchmark.py for llama-1.3b at seq 2048 and micro-batch 4, one run at a
time on an otherwise idle machine: data parallel on 1..--gpus GPUs (weak scaling, 8 micro-
batches per GPU per step), DP=2 without overlapping the gradient reduce-scatter and with the
sharded optimizer, PP at 4, 8 and 32 micro-batches (m) beside the 1F1B bubble (p-1)/(m+p-1)
(and at 32 with `parallel.pipeline_layers auto`), and TP with and without sequence
parallelism. Table in <out>/scaling.md, one JSON per run.

`sweep` benchmarks, for every TP in {1,2,4,8} x PP in {1,2,4} that fits --gpu-mem, the layout
the estimator (engine/estimator.py) ranks fastest for that shape, then the fastest of all with
sequence parallelism and with activation recompute each switched: the best-layout search of a
large model in a dozen runs instead of every combination.

Each run is one `torchrun --standalone` launch with its own CUDA_VISIBLE_DEVICES; logs go to
<out>/logs/. Extra `--section.key value` arguments go to every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARITY_ARGS = ["--model.preset", "llama-1.3b", "--model.seq_length", "1024", "--data.path", "data/stdlib_text",
               "--train.iters", "20", "--train.micro_batch_size", "2", "--train.global_batch_size", "16",
               "--train.lr", "3e-4", "--train.warmup_iters", "10", "--train.seed", "1234", "--log.quiet", "true"]
# name: (GPUs, layout arguments); ref and fp32 come first and must finish before compare.
PARITY_LAYOUTS = {
    "tp2": (2, ["--parallel.tp", "2"]),
    "tp2_sp": (2, ["--parallel.tp", "2", "--parallel.sp", "true"]),
    "pp2": (2, ["--parallel.pp", "2"]),
    "pp2_vpp2": (2, ["--parallel.pp", "2", "--parallel.vpp", "2"]),
    "dp2": (2, []),
    "dp2_shard": (2, ["--optim.shard", "true"]),
    "tp2_pp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2"]),
    "tp2_dp2": (4, ["--parallel.tp", "2"]),
    "pp2_dp2_shard": (4, ["--parallel.pp", "2", "--optim.shard", "true"]),
    "tp2_pp2_dp2_shard": (8, ["--parallel.tp", "2", "--parallel.pp", "2", "--optim.shard", "true"]),
}
# On 8 GPUs the TP=2 x PP=2 x DP=2 run also saves a checkpoint, which these layouts reload
# (one more step each): the weights must arrive bit for bit at another layout.
CHECKPOINT_SAVER = "tp2_pp2_dp2_shard"
CHECKPOINT_RELOADS = {"reload_tp4_pp2": (8, ["--parallel.tp", "4", "--parallel.pp", "2"]), "reload_1gpu": (1, [])}
BENCH_ARGS = ["--preset", "llama-1.3b", "--seq", "2048", "--micro-batch", "4", "--warmup", "3", "--steps", "6"]
MICRO_PER_GPU = 8  # gradient-accumulation steps of the data-parallel runs


@dataclasses.dataclass
class Job:
    name: str
    gpus: int
    argv: list  # script and its arguments, run under torchrun
    group: str = ""  # for --only
    bubble: float | None = None  # a pipeline run's theoretical idle fraction


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=("parity", "scaling", "sweep"))
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of this machine to use")
    parser.add_argument("--out", default="runs/multi_gpu")
    parser.add_argument("--only", default="", help="comma-separated run names or groups (dp, pp, tp) to run; "
                                                   "parity always runs its reference and fp32 runs")
    parser.add_argument("--preset", default="llama3-8b", help="sweep: the model")
    parser.add_argument("--seq", type=int, default=4096, help="sweep: sequence length")
    parser.add_argument("--global-batch", type=int, default=32, help="sweep: sequences per step")
    parser.add_argument("--gpu-mem", type=float, default=141.0, help="sweep: GiB per GPU the layouts must fit in")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before one run is stopped")
    return parser.parse_known_args(argv)


def parity_json(out: str, name: str) -> str:
    """A parity run's losses; its weights go beside it (layout_parity.weights_path)."""
    return f"{out}/parity/{name}.json"


def parity_jobs(gpus: int, out: str, extra: list) -> tuple:
    """(jobs that make the reference, the layout jobs)."""
    def job(name, world, layout_args, *more):
        argv = ["tools/layout_parity.py", "run", "--out", parity_json(out, name), *more, *PARITY_ARGS,
                "--train.output_dir", f"{out}/train/{name}", *layout_args, *extra]
        return Job(name, world, argv)

    reference = [job("ref", 1, ["--train.precision", "bf16"], "--init", f"{out}/parity/init.pt"),
                 job("fp32", 1, ["--train.precision", "fp32"])]
    layouts = [job(name, world, ["--train.precision", "bf16", *args, *checkpoint_save_args(name, out)])
               for name, (world, args) in PARITY_LAYOUTS.items() if world <= gpus]
    return reference, layouts


def checkpoint_save_args(name: str, out: str) -> list:
    return ["--checkpoint.save", f"{out}/checkpoint"] if name == CHECKPOINT_SAVER else []


def reload_jobs(gpus: int, out: str, extra: list) -> list:
    """Runs that load the saver's checkpoint at other layouts and train one step more."""
    if PARITY_LAYOUTS[CHECKPOINT_SAVER][0] > gpus:
        return []
    arguments = PARITY_ARGS + extra
    saved_step = int(last_value(arguments, "--train.iters"))
    return [Job(name, world, ["tools/layout_parity.py", "run", "--out", parity_json(out, name),
                              "--init", layout_parity_init(out, name), *arguments,
                              "--train.output_dir", f"{out}/train/{name}", "--train.precision", "bf16",
                              "--checkpoint.load", f"{out}/checkpoint", *args, "--train.iters", str(saved_step + 1)])
            for name, (world, args) in CHECKPOINT_RELOADS.items()]


def last_value(arguments: list, key: str) -> str:
    """The value of the last `key` in a `--key value` list (the one the parser keeps)."""
    return next(arguments[i + 1] for i in range(len(arguments) - 2, -1, -1) if arguments[i] == key)


def layout_parity_init(out: str, name: str) -> str:
    from tools.layout_parity import init_path

    return init_path(parity_json(out, name))


def bubble(pp: int, microbatches: int, vpp: int = 1) -> float:
    """Idle fraction of a pipeline step: 1F1B (p-1)/(m+p-1); interleaving over vpp chunks per
    stage shrinks the warm-up and cool-down to (p-1)/vpp of a micro-batch's time each."""
    return (pp - 1) / (vpp * microbatches + pp - 1)


def scaling_jobs(gpus: int, out: str, extra: list) -> list:
    def job(name, group, world, args, idle=None):
        argv = ["tools/benchmark.py", *BENCH_ARGS, "--out", f"{out}/scaling/{name}.json", *args, *extra]
        return Job(name, world, argv, group, idle)

    jobs = []
    dp = 1
    while dp <= gpus:
        jobs.append(job(f"dp{dp}", "dp", dp, ["--global-batch", str(4 * MICRO_PER_GPU * dp)]))
        dp *= 2
    if gpus >= 2:
        batch = ["--global-batch", str(4 * MICRO_PER_GPU * 2)]
        jobs.append(job("dp2_no_overlap", "dp", 2, batch + ["--optim.overlap_grad_reduce", "false"]))
        jobs.append(job("dp2_shard", "dp", 2, batch + ["--optim.shard", "true"]))
    pp = 2
    while pp <= min(gpus, 4):
        for micro in ((4, 8, 32) if pp == 2 else (8, 32)):
            batch = ["--pp", str(pp), "--global-batch", str(4 * micro)]
            jobs.append(job(f"pp{pp}_m{micro}", "pp", pp, batch, bubble(pp, micro)))
        jobs.append(job(f"pp{pp}_vpp2_m8", "pp", pp, ["--pp", str(pp), "--global-batch", "32", "--parallel.vpp", "2"],
                        bubble(pp, 8, 2)))
        jobs.append(job(f"pp{pp}_m32_auto_split", "pp", pp, ["--pp", str(pp), "--global-batch", "128",
                                                             "--parallel.pipeline_layers", "auto"], bubble(pp, 32)))
        pp *= 2
    tp = 2
    while tp <= min(gpus, 8):
        for sp in (False, True):
            args = ["--tp", str(tp), "--global-batch", str(4 * MICRO_PER_GPU)] + (["--parallel.sp", "true"] if sp else [])
            jobs.append(job(f"tp{tp}" + ("_sp" if sp else ""), "tp", tp, args))
        tp *= 2
    return jobs


def selected(jobs: list, only: str) -> list:
    """The jobs named, or in a group named, by --only (all when it is empty)."""
    if not only:
        return jobs
    wanted = set(only.split(","))
    unknown = wanted - {job.name for job in jobs} - {job.group for job in jobs}
    if unknown:
        raise SystemExit(f"error: --only names no run or group: {', '.join(sorted(unknown))} "
                         f"(runs: {', '.join(job.name for job in jobs)})")
    return [job for job in jobs if job.name in wanted or job.group in wanted]


def launch(job: Job, devices: list, out: str) -> tuple:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, devices)), PYTHONUNBUFFERED="1")
    log = open(os.path.join(out, "logs", f"{job.name}.log"), "w")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(job.gpus), *job.argv]
    log.write(" ".join(command) + "\n")
    log.flush()
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def run_jobs(jobs: list, gpus: int, out: str, side_by_side: bool, timeout: float) -> dict:
    """Run the jobs in order, packing them onto free GPUs when side_by_side; name -> exit code."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    free, running, codes, pending = list(range(gpus)), {}, {}, list(jobs)
    while pending or running:
        while pending and len(free) >= pending[0].gpus and (side_by_side or not running):
            job = pending.pop(0)
            devices, free = free[:job.gpus], free[job.gpus:]
            process, log = launch(job, devices, out)
            running[job.name] = (job, process, log, devices, time.time())
        time.sleep(1)
        for name, (job, process, log, devices, started) in list(running.items()):
            elapsed = time.time() - started
            if process.poll() is None and elapsed > timeout:
                process.kill()
            if process.poll() is None:
                continue
            log.close()
            codes[name] = process.returncode
            free = sorted(free + devices)
            del running[name]
            status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode}, {out}/logs/{name}.log)"
            print(f"[{len(codes)}/{len(jobs)}] {name} on {job.gpus} GPU(s): {status} in {elapsed:.0f} s", flush=True)
    return codes


def run_parity(args, extra) -> int:
    from tools import layout_parity

    reference, layouts = parity_jobs(args.gpus, args.out, extra)
    layouts = selected(layouts, args.only)
    os.makedirs(f"{args.out}/parity", exist_ok=True)
    codes = run_jobs(reference + layouts, args.gpus, args.out, True, args.timeout)
    if codes.get("ref") or codes.get("fp32"):
        print("error: the reference runs failed; nothing to compare")
        return 1
    done = [parity_json(args.out, job.name) for job in reference + layouts if codes.get(job.name) == 0]
    rows = layout_parity.compare_runs(done, f"{args.out}/parity/init.pt")
    with open(done[0]) as handle:
        reference_run = json.load(handle)
    with open(f"{args.out}/parity.json", "w") as handle:
        json.dump({"reference": reference_run, "rows": rows}, handle, indent=1)
    table = layout_parity.format_table(rows, reference_run)
    with open(f"{args.out}/parity.md", "w") as handle:
        handle.write(table)
    print(table)
    reloads_ok = check_reloads(args, extra, codes)
    failed = [name for name, code in codes.items() if code]
    return 1 if failed or not reloads_ok or not all(row.get("within_tolerance", True) for row in rows) else 0


def check_reloads(args, extra, codes: dict) -> bool:
    """Reload the saver's checkpoint at other layouts (8 GPUs); append the table to parity.md."""
    from tools import layout_parity

    jobs = reload_jobs(args.gpus, args.out, extra)
    if not jobs or CHECKPOINT_SAVER not in codes:  # fewer GPUs, or --only left the saver out
        return True
    if codes[CHECKPOINT_SAVER] != 0:
        return False
    codes.update(run_jobs(jobs, args.gpus, args.out, True, args.timeout))
    done = [parity_json(args.out, job.name) for job in jobs if codes.get(job.name) == 0]
    rows = layout_parity.compare_reloads(layout_parity.weights_path(parity_json(args.out, CHECKPOINT_SAVER)), done)
    table = layout_parity.format_reloads(rows, CHECKPOINT_SAVER)
    with open(f"{args.out}/parity.md", "a") as handle:
        handle.write("\n" + table)
    print(table)
    return len(rows) == len(jobs) and all(row["identical"] for row in rows)


SWEEP_TP, SWEEP_PP = (1, 2, 4, 8), (1, 2, 4)


def sweep_layouts(gpus: int, preset: str, seq: int, global_batch: int, gpu_mem_gib: float) -> list:
    """For each TP x PP shape that fits, the estimator's fastest layout of that shape (micro-
    batch, interleaving, recompute, sharding); then the overall fastest one again with sequence
    parallelism and with recompute each switched the other way, where that still fits."""
    from engine import estimator as est
    from models.config import ModelConfig, resolve_preset

    model = resolve_preset(ModelConfig(preset=preset, seq_length=seq, max_position_embeddings=seq))
    hw = est.Hardware(gpu_mem_gib=gpu_mem_gib)
    ranked = [layout for _, layout, _, _ in est.plan(model, gpus, global_batch, hw)
              if layout.tp in SWEEP_TP and layout.pp in SWEEP_PP]
    chosen = {}
    for layout in ranked:
        chosen.setdefault((layout.tp, layout.pp), layout)
    layouts = list(chosen.values())
    if layouts:
        best = layouts[0]
        flips = [dataclasses.replace(best, sp=not best.sp)] if best.tp > 1 else []
        flips.append(dataclasses.replace(best, recompute="none" if best.recompute == "full" else "full"))
        layouts += [flip for flip in flips if est.peak_memory(model, flip).total <= gpu_mem_gib * est.GIB]
    return layouts


def sweep_jobs(gpus: int, out: str, extra: list, preset: str, seq: int, global_batch: int, gpu_mem_gib: float) -> list:
    from engine.estimator import describe

    jobs = []
    for layout in sweep_layouts(gpus, preset, seq, global_batch, gpu_mem_gib):
        name = describe(layout).replace(" ", "_")
        args = ["--preset", preset, "--seq", str(seq), "--micro-batch", str(layout.micro_batch),
                "--global-batch", str(global_batch), "--tp", str(layout.tp), "--pp", str(layout.pp),
                "--warmup", "2", "--steps", "4", "--parallel.vpp", str(layout.vpp),
                "--parallel.sp", str(layout.sp).lower(), "--model.recompute", layout.recompute,
                "--optim.shard", str(layout.shard_optimizer).lower(), "--out", f"{out}/scaling/{name}.json"]
        jobs.append(Job(name, gpus, ["tools/benchmark.py", *args, *extra], "sweep"))
    return jobs


def benchmark_row(out: str, name: str) -> dict | None:
    path = f"{out}/scaling/{name}.json"
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)["rows"][0]


def scaling_table(jobs: list, out: str) -> str:
    from tools.benchmark import mfu_text

    results = {job.name: benchmark_row(out, job.name) for job in jobs}
    one_gpu = (benchmark_row(out, "dp1") or {}).get("tokens_per_s_per_gpu")  # from this or an earlier --only run
    lines = ["| run | GPUs | tokens/s per GPU | vs 1 GPU | theoretical bubble | MFU | peak GiB | optimizer state GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        row = results.get(job.name)
        if row is None:
            lines.append(f"| {job.name} | {job.gpus} | failed | | | | | |")
            continue
        ratio = f"{100 * row['tokens_per_s_per_gpu'] / one_gpu:.1f}%" if one_gpu else "-"
        theory = "" if job.bubble is None else f"{100 * job.bubble:.1f}%"
        mfu = mfu_text(row)
        lines.append(f"| {job.name} | {job.gpus} | {row['tokens_per_s_per_gpu']:.0f} | {ratio} | {theory} | {mfu} | "
                     f"{row['peak_mem_gib']:.1f} | {row.get('optimizer_state_gib', 0):.2f} |")
    return "\n".join(lines) + "\n"


def run_scaling(args, extra) -> int:
    if args.suite == "sweep":
        jobs = sweep_jobs(args.gpus, args.out, extra, args.preset, args.seq, args.global_batch, args.gpu_mem)
    else:
        jobs = scaling_jobs(args.gpus, args.out, extra)
    jobs = selected(jobs, args.only)
    os.makedirs(f"{args.out}/scaling", exist_ok=True)
    codes = run_jobs(jobs, args.gpus, args.out, False, args.timeout)
    table = scaling_table(jobs, args.out)
    with open(f"{args.out}/scaling.md", "a") as handle:
        handle.write(table)
    print(table)
    return 1 if any(codes.values()) else 0


def main(argv=None) -> int:
    args, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    return run_parity(args, extra) if args.suite == "parity" else run_scaling(args, extra)  # scaling, sweep


if __name__ == "__main__":
    sys.exit(main())

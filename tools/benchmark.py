"""Measure training throughput of a preset: tokens/s, MFU, TFLOP/s per GPU and peak memory.

    python tools/benchmark.py --preset llama-1.3b --seq 2048 --micro-batch 4 --steps 20 --baselines --out bench.json
    torchrun --nproc-per-node 8 tools/benchmark.py --preset llama3-8b --tp 2 --pp 2 ...

Warm-up steps are excluded from the timing. Peak memory and optimizer state (fp32 masters
included) are those of the rank that holds the most. `--baselines` also times, in the same launch and
on the same GPU (single process only), a plain-PyTorch model of the same shape (eager and
torch.compile) and Hugging Face LlamaForCausalLM, and reports Trellis's ratio to each. With
`--global-batch` larger than the micro-batch, every stack accumulates gradients over the same
number of micro-batches per optimizer step, as a training run does.
Extra `--section.key value` arguments go to the Trellis configuration unchanged.
`--profile FILE` writes the device time of 2 more steps by kind of kernel (tools/kernel_breakdown.py)
and torch.profiler's kernel table of them; `--idle FILE` writes
where the GPU waits during 1 more step (tools/gpu_idle.py), for finding host-side stalls.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.config import ADAPTER_METHODS, parse_args, validate  # noqa: E402
from engine.metrics import device_peak_tflops  # noqa: E402


PROFILED_STEPS = 2


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-1.3b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=0, help="0: micro-batch x data-parallel size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--out", default="", help="write the rows as JSON here, with the device, torch's version and "
                                                  "the kernel libraries (attention backend, flash-attn, cuDNN)")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of 2 extra Trellis steps here")
    parser.add_argument("--idle", default="", metavar="FILE",
                        help="write where the GPU idles in 1 extra traced Trellis step here, the trace "
                             "beside it (FILE.trace.json; tools/gpu_idle.py); CUDA only")
    parser.add_argument("--summarize", default="", metavar="DIR",
                        help="print one table of every benchmark JSON in DIR (from --out) and exit")
    return parser.parse_known_args(argv)


def summarise(name, step_times, tokens_per_step, flops_per_token, world, peak, mem_gib):
    seconds = sorted(step_times)[len(step_times) // 2]  # median step
    tokens_per_s = tokens_per_step / seconds
    tflops = tokens_per_s * flops_per_token / world / 1e12
    return {"name": name, "step_s": seconds, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
            "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None, "peak_mem_gib": mem_gib,
            "flops_per_token": flops_per_token}


def timed_steps(step_fn, warmup, steps, device):
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    mem = (torch.cuda.max_memory_allocated() + graph_pool_transient_bytes()) / 2**30 if device.type == "cuda" else 0.0
    return times, mem


def graph_pool_transient_bytes() -> int:
    """What CUDA graphs' private memory pools hold beyond their live tensors. A replay reuses
    that memory without going through the allocator, so max_memory_allocated never sees it
    (with `model.cuda_graphs true` it missed every layer's activations); 0 without graphs."""
    return sum(segment["total_size"] - segment["allocated_size"] for segment in torch.cuda.memory_snapshot()
               if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0))


def extra_steps(args) -> int:
    """Steps run after the timed ones (--profile, --idle)."""
    return (PROFILED_STEPS if args.profile else 0) + (1 if args.idle else 0)


def run_trellis(args, extra):
    from engine.training import Trainer

    argv = ["--model.preset", args.preset, "--model.seq_length", str(args.seq), "--data.mock", "true",
            "--train.micro_batch_size", str(args.micro_batch), "--train.global_batch_size", str(args.global_batch),
            # One step more than are run: a run prefetches each step's batches during the step
            # before, except after its last, so this way every step run works as in a long run.
            "--train.iters", str(args.warmup + args.steps + extra_steps(args) + 1),
            "--parallel.tp", str(args.tp), "--parallel.pp", str(args.pp),
            "--log.quiet", "true", "--train.output_dir", "/tmp/trellis_benchmark"] + extra
    cfg = validate(parse_args(argv), int(os.environ.get("WORLD_SIZE", 1)))
    trainer = Trainer(cfg)
    times, mem = timed_steps(trainer.train_step, args.warmup, args.steps, trainer.device)
    if args.profile:
        profile_steps(trainer, args.profile)
    if args.idle:
        write_idle_report(trainer, args.idle)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    peak = device_peak_tflops(trainer.device, cfg.log.peak_tflops)
    row = summarise("trellis", times, tokens, step_flops_per_token(cfg, trainer), trainer.grid.world_size, peak,
                    max_over_ranks(mem, trainer.device))
    row["optimizer_state_gib"] = max_over_ranks(trainer.optimizer.state_bytes() / 2**30, trainer.device)
    row["config"] = " ".join(argv)
    row["fp8_backend"] = trainer.fp8_backend
    return cfg, trainer, row


def step_flops_per_token(cfg, trainer) -> float:
    """Model FLOPs per token of the work a step must do (recompute excluded, as MFU counts).
    Full training: cfg.model.flops_per_token(), 6 per matmul weight. LoRA and QLoRA freeze
    every base weight, whose matmuls then need the forward and the input gradient only (4 per
    weight, no weight gradient); the adapters are trained matmuls (6 per parameter)."""
    if cfg.finetune.method not in ADAPTER_METHODS:
        return cfg.model.flops_per_token()
    trained = sum(math.prod(p.shard_spec.full_shape) if hasattr(p, "shard_spec") else p.numel()
                  for chunk in trainer.model_chunks for p in chunk.parameters() if p.requires_grad)
    if torch.distributed.is_initialized() and cfg.parallel.pp > 1:  # each stage holds its own adapters
        total = torch.tensor([float(trained)], dtype=torch.float64, device=trainer.device)
        torch.distributed.all_reduce(total, group=trainer.grid.pp_group)
        trained = total.item()
    return cfg.model.flops_per_token() - 2.0 * cfg.model.matmul_params() + 6.0 * trained


def max_over_ranks(value: float, device) -> float:
    """The largest value of any rank (peak memory differs by pipeline stage and TP rank)."""
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def profile_steps(trainer, path: str, steps: int = PROFILED_STEPS) -> None:
    """Kernel-level time of a few training steps, sorted by device time (where it goes)."""
    from torch.profiler import ProfilerActivity, profile

    from tools.kernel_breakdown import breakdown, device_kernels, format_breakdown

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
    sort_key = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as handle:
        handle.write(format_breakdown(breakdown(device_kernels(prof)), steps) + "\n")
        handle.write(prof.key_averages().table(sort_by=sort_key, row_limit=60, max_name_column_width=90))


def write_idle_report(trainer, path: str) -> None:
    """tools/gpu_idle.py's report of one more training step, to `path` (and printed)."""
    from tools.gpu_idle import format_report, idle_report, trace_steps

    if trainer.device.type != "cuda":
        raise SystemExit("error: --idle needs a CUDA device (it reports where the GPU waits)")
    torch.cuda.synchronize()
    events = trace_steps(trainer.train_step, torch.cuda.synchronize, path + ".trace.json")
    text = format_report(idle_report(events))
    with open(path, "w") as handle:
        handle.write(text)
    print(text, end="")


def run_baseline(name, cfg, args, device, peak):
    from tools.baselines import baseline_step_fn, build_baseline

    torch.manual_seed(0)
    model = build_baseline(name, cfg.model, device)
    accumulation = cfg.train.global_batch_size // args.micro_batch
    step = baseline_step_fn(model, device, accumulation)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    times, mem = timed_steps(lambda: step(tokens[:, :-1], tokens[:, 1:]), args.warmup, args.steps, device)
    del model, step
    return summarise(name, times, cfg.train.global_batch_size * args.seq, cfg.model.flops_per_token(), 1, peak, mem)


def mfu_text(row) -> str:
    """A result row's MFU as a table cell ("-" where the device's peak is unknown)."""
    return f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"


def print_table(rows):
    print("| stack | tokens/s per GPU | TFLOP/s per GPU | MFU | peak memory GiB | Trellis / this |")
    print("|---|---|---|---|---|---|")
    ours = rows[0]["tokens_per_s_per_gpu"]
    for row in rows:
        mfu = mfu_text(row)
        print(f"| {row['name']} | {row['tokens_per_s_per_gpu']:.0f} | {row['tflops_per_gpu']:.1f} | {mfu} | "
              f"{row['peak_mem_gib']:.1f} | {ours / row['tokens_per_s_per_gpu']:.2f}x |")


def summarize(directory: str) -> None:
    """One row per stack of every `--out` JSON file in `directory`, in file-name order."""
    print("| run | stack | tokens/s per GPU | MFU | peak memory GiB | device |")
    print("|---|---|---|---|---|---|")
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(directory, name)) as handle:
            report = json.load(handle)
        for row in report.get("rows", []):
            if "tokens_per_s_per_gpu" not in row:  # a stack that could not run (bench_dpo's TRL row)
                print(f"| {name[:-5]} | {row.get('name', '?')} | error: {row.get('error', 'no result')} | | | |")
                continue
            mfu = mfu_text(row)
            print(f"| {name[:-5]} | {row['name']} | {row['tokens_per_s_per_gpu']:.0f} | {mfu} | "
                  f"{row['peak_mem_gib']:.1f} | {report.get('device', '?')} |")


def main(argv=None):
    args, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    if args.summarize:
        if not os.path.isdir(args.summarize):
            raise SystemExit(f"error: --summarize: {args.summarize!r} is not a directory")
        summarize(args.summarize)
        return
    cfg, trainer, row = run_trellis(args, extra)
    rows = [row]
    rank0 = trainer.grid.rank == 0
    if args.baselines:
        if trainer.grid.world_size != 1:
            raise SystemExit("error: --baselines runs on a single process only")
        device, peak = trainer.device, device_peak_tflops(trainer.device, cfg.log.peak_tflops)
        del trainer
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        for name in ("plain-eager", "plain-compile", "hf"):
            rows.append(run_baseline(name, cfg, args, device, peak))
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if rank0:
        print_table(rows)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "kernels": kernel_libraries(cfg), "rows": rows}, handle,
                          indent=1)
    # Without this, NCCL ranks can hang at exit polling the store of a rank that already left.
    from engine.training import shutdown
    shutdown()


def kernel_libraries(cfg) -> dict:
    """The libraries beside the tree that Trellis's row depends on: which attention kernels
    `model.attention_backend` could take, cuDNN's version (SDPA's kernels on Hopper) and
    Transformer Engine's (its FP8 linears and attention), read from the installed package's
    metadata so that a run which does not use TE does not import it."""
    from importlib import metadata

    from models.flash_kernels import flash_kernels

    flash = flash_kernels()
    try:
        te_version = metadata.version("transformer_engine")
    except metadata.PackageNotFoundError:
        te_version = None
    return {"attention_backend": cfg.model.attention_backend, "flash_attn": flash.name if flash else None,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "transformer_engine": te_version}


if __name__ == "__main__":
    main()

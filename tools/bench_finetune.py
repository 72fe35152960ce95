"""Fine-tuning benchmarks on one GPU: LoRA against Hugging Face + PEFT, QLoRA on Llama-3-8B
against Hugging Face + PEFT + bitsandbytes, and GaLore's optimizer memory against AdamW.

    python tools/bench_finetune.py --mode lora [--targets qkvo|all] [--micro-batch 4]
    python tools/bench_finetune.py --mode qlora
    python tools/bench_finetune.py --mode galore
    python tools/bench_finetune.py --mode lora qlora galore --out bench_finetune.jsonl

- lora: `--preset` (llama-1.3b), seq 2048, LoRA rank 16 on q,k,v,o (or every linear). Trellis
  (bf16 weights, fp32 masters of the adapters) and, in the same launch on the same GPU,
  Hugging Face LlamaForCausalLM with bf16 weights, SDPA, no gradient checkpointing, plus a
  PEFT LoraConfig of the same rank, alpha and targets, fed the same mock token samples.
- qlora: `--qlora-preset` (llama3-8b), `--finetune.method qlora`, micro-batch 1, full
  recompute, bf16, random initial weights quantised to NF4 in place, LoRA on every linear
  (`--targets all`). Then, in the same launch on the same GPU, the QLoRA recipe in Hugging Face
  (stack hf+peft+bnb): LlamaForCausalLM with bf16 weights, SDPA, the seven projections of every
  layer in bitsandbytes NF4 (double-quantised, blocksize 64, bf16 compute), non-reentrant
  gradient checkpointing, PEFT LoRA of the same rank, alpha and targets, the same mock samples.
  That row needs `bitsandbytes` (optional, not a project dependency) and CUDA; without either, a
  line says why it is skipped and only the Trellis row is reported.
- galore: `--preset`, full fine-tuning with AdamW and with GaLore (`--galore-rank`): optimizer
  state bytes (moments and bases, and with the fp32 masters), peak memory, median step time
  and the time of one step that refreshes every projection (the SVDs).

Each result is one JSON line (stdout, and `--out` when given), then a table. Timings are
medians of `--steps` steps after `--warmup` (tools/benchmark.py measures the same way); peak
memory is counted from after the warm-up. `--device cpu --preset tiny --qlora-preset tiny
--seq 64` runs every mode on a CPU in seconds (a check of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tools.benchmark import run_trellis, summarise, timed_steps  # noqa: E402

TARGETS = {"qkvo": ["q", "k", "v", "o"], "all": ["q", "k", "v", "o", "gate", "up", "down"]}


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=("lora", "qlora", "galore"), default=["lora", "qlora", "galore"])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", default="llama-1.3b", help="model of the lora and galore modes")
    parser.add_argument("--qlora-preset", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="lora and galore modes")
    parser.add_argument("--qlora-micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="",
                        help="LoRA targets (default: qkvo for lora, all for qlora, as the QLoRA paper)")
    parser.add_argument("--galore-rank", type=int, default=512)
    parser.add_argument("--out", default="", help="append the JSON lines to this file")
    return parser.parse_args(argv)


def bench_args(args, preset: str, micro_batch: int):
    """The namespace tools/benchmark.py's run_trellis reads."""
    return types.SimpleNamespace(preset=preset, seq=args.seq, micro_batch=micro_batch, global_batch=0,
                                 warmup=args.warmup, steps=args.steps, tp=1, pp=1, profile="", idle="")


def engine_flags(args) -> list:
    precision = "bf16" if args.device == "cuda" else "fp32"
    return ["--train.device", args.device, "--train.precision", precision]


def lora_flags(args, targets: str) -> list:
    return ["--finetune.method", "lora", "--finetune.lora_rank", str(args.lora_rank),
            "--finetune.lora_alpha", str(2 * args.lora_rank), "--finetune.lora_targets", " ".join(TARGETS[targets])]


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def result(mode: str, stack: str, row: dict, cfg, micro_batch: int, **extra) -> dict:
    return {"mode": mode, "stack": stack, "preset": cfg.model.preset, "seq": cfg.model.seq_length,
            "micro_batch": micro_batch, "tokens_per_s": row["tokens_per_s"], "step_s": row["step_s"],
            "peak_mem_gib": row["peak_mem_gib"], **extra}


# ---- modes --------------------------------------------------------------------------------
def bench_lora(args) -> list:
    from tools.baselines import hf_lora_llama

    targets = args.targets or "qkvo"
    cfg, trainer, row = run_trellis(bench_args(args, args.preset, args.micro_batch),
                                    engine_flags(args) + lora_flags(args, targets))
    device = trainer.device
    ours = result("lora", "trellis", row, cfg, args.micro_batch, targets=targets, rank=args.lora_rank)
    del trainer
    free_memory(device)
    return [ours, against_hf(args, ours, "hf+peft", hf_lora_llama, cfg, row["flops_per_token"], device)]


def bench_qlora(args) -> list:
    from tools.baselines import hf_qlora_llama

    targets = args.targets or "all"
    flags = engine_flags(args) + lora_flags(args, targets) + ["--finetune.method", "qlora", "--model.recompute", "full"]
    start = time.perf_counter()
    cfg, trainer, row = run_trellis(bench_args(args, args.qlora_preset, args.qlora_micro_batch), flags)
    holders = [m.nf4 for c in trainer.model_chunks for m in c.modules() if hasattr(m, "nf4")]
    nf4_bytes = sum(h.nbytes() for h in holders)
    bf16_bytes = 2 * sum(h.numel for h in holders)
    ours = result("qlora", "trellis", row, cfg, args.qlora_micro_batch, targets=targets, rank=args.lora_rank,
                  nf4_gib=nf4_bytes / 2**30, same_weights_bf16_gib=bf16_bytes / 2**30,
                  setup_and_run_s=time.perf_counter() - start)
    device = trainer.device
    del trainer, holders
    free_memory(device)
    skipped = qlora_baseline_missing(device)
    if skipped:
        print(f"bench_finetune: skipping the Hugging Face + PEFT + bitsandbytes QLoRA row (hf+peft+bnb): {skipped}",
              flush=True)
        return [ours]
    return [ours, against_hf(args, ours, "hf+peft+bnb", hf_qlora_llama, cfg, row["flops_per_token"], device)]


def qlora_baseline_missing(device) -> str:
    """Why the Hugging Face + PEFT + bitsandbytes QLoRA row cannot run here ("" when it can)."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # not installed, or installed without a usable backend
        return f"bitsandbytes is not importable ({type(error).__name__}: {error}); pip install bitsandbytes to add it"
    return ""


def against_hf(args, ours: dict, stack: str, build, cfg, flops_per_token: float, device) -> dict:
    """The Hugging Face row of Trellis's row `ours`: times the model that `build(cfg.model,
    targets, rank, alpha, device)` returns (tools/baselines.py) on the same mock samples as
    Trellis's first step, counting the same work per token as Trellis, and adds Trellis's ratios
    to it (`speedup_vs_hf`, `memory_vs_hf`) to `ours`."""
    from engine.batches import MockDataset
    from tools.baselines import baseline_step_fn

    micro_batch, targets = ours["micro_batch"], ours["targets"]
    torch.manual_seed(0)
    model = build(cfg.model, TARGETS[targets], args.lora_rank, 2 * args.lora_rank, device)
    data = MockDataset(cfg.model.vocab_size, args.seq, cfg.train.seed, 0)
    tokens = torch.stack([torch.from_numpy(data[i]) for i in range(micro_batch)]).to(device)
    step = baseline_step_fn(model, device)
    times, mem = timed_steps(lambda: step(tokens[:, :-1], tokens[:, 1:]), args.warmup, args.steps, device)
    row = summarise("hf", times, micro_batch * args.seq, flops_per_token, 1, None, mem)
    theirs = result(ours["mode"], stack, row, cfg, micro_batch, targets=targets, rank=args.lora_rank)
    del model, step
    free_memory(device)
    ours["speedup_vs_hf"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    ours["memory_vs_hf"] = ours["peak_mem_gib"] / theirs["peak_mem_gib"] if theirs["peak_mem_gib"] else None
    return theirs


def bench_galore(args) -> list:
    rows = []
    # The projections refresh at update 0 and then every interval: set the interval so that the
    # step right after the timed ones refreshes, and time that step on its own.
    interval = args.warmup + args.steps
    for name in ("adamw", "galore_adamw"):
        flags = engine_flags(args) + ["--optim.name", name, "--optim.galore_rank", str(args.galore_rank),
                                      "--optim.galore_update_interval", str(interval)]
        cfg, trainer, row = run_trellis(bench_args(args, args.preset, args.micro_batch), flags)
        refresh_s, _ = timed_steps(trainer.train_step, 0, 1, trainer.device)
        optimizer = trainer.optimizer
        rows.append(result("galore", name, row, cfg, args.micro_batch, galore_rank=args.galore_rank if name != "adamw" else None,
                           optimizer_state_gib=optimizer.inner_state_bytes() / 2**30,
                           state_with_masters_gib=optimizer.state_bytes() / 2**30,
                           refresh_step_s=refresh_s[0] if name != "adamw" else None))
        device = trainer.device
        del trainer, optimizer
        free_memory(device)
    rows[1]["state_vs_adamw"] = rows[1]["optimizer_state_gib"] / rows[0]["optimizer_state_gib"]
    return rows


# ---- output ---------------------------------------------------------------------------------
def number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows) -> None:
    print("| mode | stack | model | seq x mb | tokens/s | step s | peak GiB | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        notes = []
        if "speedup_vs_hf" in row:
            notes.append(f"{row['speedup_vs_hf']:.2f}x HF tokens/s, {number(row['memory_vs_hf'], '.2f')}x HF memory")
        if "nf4_gib" in row:
            notes.append(f"NF4 base {row['nf4_gib']:.2f} GiB (bf16 {row['same_weights_bf16_gib']:.2f} GiB)")
        if "optimizer_state_gib" in row:
            notes.append(f"optimizer state {row['optimizer_state_gib']:.2f} GiB "
                         f"(+masters {row['state_with_masters_gib']:.2f})")
        if row.get("state_vs_adamw") is not None:
            notes.append(f"{row['state_vs_adamw']:.2f}x AdamW state, refresh step {row['refresh_step_s']:.2f} s")
        print(f"| {row['mode']} | {row['stack']} | {row['preset']} | {row['seq']} x {row['micro_batch']} | "
              f"{row['tokens_per_s']:.0f} | {row['step_s']:.3f} | {row['peak_mem_gib']:.2f} | {'; '.join(notes)} |")


def main(argv=None) -> list:
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    modes = {"lora": bench_lora, "qlora": bench_qlora, "galore": bench_galore}
    environment = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}
    rows = []
    for mode in args.mode:
        for row in modes[mode](args):
            row.update(environment)
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(line + "\n")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()

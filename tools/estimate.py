"""Estimate per-GPU memory and throughput of a layout, or plan the layouts that fit on N GPUs.

  python tools/estimate.py --preset llama-1.3b --seq 2048 --micro-batch 4
  python tools/estimate.py --preset llama3-70b --tp 8 --pp 4 --vpp 5 --dp 8 --sp --global-batch 512 --shard
  python tools/estimate.py --preset llama3-8b --plan 64 --gpu-mem 80 --global-batch 512 [--plot plan.png]

The arithmetic lives in engine/estimator.py; docs/benchmarks.md ("Estimator") checks it against
measured runs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import estimator as est  # noqa: E402
from engine.config import load_yaml  # noqa: E402
from models.config import ModelConfig, resolve_preset  # noqa: E402


def parse_cli(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-1.3b")
    parser.add_argument("--config", default="", help="a training YAML; its model and parallel sections are used")
    parser.add_argument("--layers", type=int, default=0, help="override model.num_layers")
    parser.add_argument("--seq", type=int, default=0, help="override model.seq_length")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=0)
    parser.add_argument("--recompute", choices=("none", "full"), default="none")
    parser.add_argument("--precision", choices=tuple(est.WEIGHT_BYTES), default="bf16")
    parser.add_argument("--shard", action="store_true", help="distributed optimizer (optim.shard)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="model.cuda_graphs true: no host-time floor for layouts without pipelining")
    parser.add_argument("--unfused-ce", action="store_true", help="model.fused_cross_entropy false")
    parser.add_argument("--tflops", type=float, default=0.0, help="achieved TFLOP/s per GPU (default: calibrated)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, default=360.0, help="GB/s bus bandwidth inside a node")
    parser.add_argument("--network-gbps", type=float, default=40.0, help="GB/s per GPU between nodes")
    parser.add_argument("--host-ms-per-layer", type=float, default=5.3,
                        help="host time of one layer's forward and backward per micro-batch, in ms (0: ignore)")
    parser.add_argument("--objective", choices=("lm", *est.PAIR_OBJECTIVES), default="lm",
                        help="dpo: --micro-batch and --global-batch count pairs; adds the frozen reference copy "
                             "and its forward. dpo-no-reference (dpo.loss simpo or orpo): pairs, no reference")
    parser.add_argument("--plan", type=int, default=0, help="list layouts that fit on this many GPUs")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU for --plan")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--plot", default="", help="write a PNG (needs matplotlib)")
    return parser.parse_args(argv)


def build_model(args) -> ModelConfig:
    model = ModelConfig(preset=args.preset)
    if args.config:
        for key, value in load_yaml(args.config).get("model", {}).items():
            setattr(model, key, value)
    if args.layers:
        model.num_layers = args.layers
    if args.seq:
        model.seq_length = args.seq
        model.max_position_embeddings = max(model.max_position_embeddings, args.seq)
    model.fused_cross_entropy = not args.unfused_ce and model.fused_cross_entropy
    return resolve_preset(model)


def build_layout(args) -> est.Layout:
    config = load_yaml(args.config) if args.config else {}
    parallel = config.get("parallel", {})
    cuda_graphs = args.cuda_graphs or bool(config.get("model", {}).get("cuda_graphs", False))
    per_sample = est.sequences_per_sample(args.objective)
    return est.Layout(tp=parallel.get("tp", args.tp), pp=parallel.get("pp", args.pp), vpp=parallel.get("vpp", args.vpp),
                      dp=args.dp, sp=parallel.get("sp", args.sp), micro_batch=args.micro_batch * per_sample,
                      global_batch=args.global_batch * per_sample, recompute=args.recompute, precision=args.precision,
                      shard_optimizer=args.shard, compile=args.compile, cuda_graphs=cuda_graphs,
                      objective=args.objective)


def memory_row(memory: est.Memory) -> str:
    g = memory.gib()
    return " | ".join(f"{g[k]:.1f}" for k in ("weights", "gradients", "optimizer", "activations", "logits", "allowance", "total"))


def print_single(model, layout, hw) -> None:
    memory, time = est.peak_memory(model, layout), est.step_time(model, layout, hw)
    tps = est.tokens_per_second(model, layout, hw)
    print(f"layout: {est.describe(layout)} ({layout.gpus} GPUs, {layout.microbatches()} microbatches per step)")
    print("| GiB per GPU | weights | gradients | optimizer | activations | logits | allowance | total |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| peak stage | {memory_row(memory)} |")
    print("| step ms | compute | optimizer | TP comm | DP comm | PP comm | bubble | total |")
    print("|---|---|---|---|---|---|---|---|")
    parts = [time.compute, time.optimizer, time.tp_comm, time.dp_comm, time.pp_comm, time.bubble, time.total]
    print("| | " + " | ".join(f"{p * 1e3:.1f}" for p in parts) + " |")
    mfu = tps / layout.gpus * model.flops_per_token() / 989e12
    print(f"tokens/s: {tps:.0f} total, {tps / layout.gpus:.0f} per GPU, MFU {mfu:.1%} (989 TFLOP/s peak)")


def print_plan(results, gpus, top) -> None:
    print(f"{len(results)} layouts fit on {gpus} GPUs; the fastest {min(top, len(results))}:")
    print("| rank | layout | GiB per GPU | step ms | tokens/s per GPU | bubble ms | comm ms |")
    print("|---|---|---|---|---|---|---|")
    for index, (tps, layout, memory, time) in enumerate(results[:top], 1):
        comm = time.tp_comm + time.dp_comm + time.pp_comm
        print(f"| {index} | {est.describe(layout)} | {memory.total / est.GIB:.1f} | {time.total * 1e3:.0f} | "
              f"{tps / gpus:.0f} | {time.bubble * 1e3:.0f} | {comm * 1e3:.0f} |")


def plot(results, path: str, top: int) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install matplotlib)") from None
    shown = results[:top]
    labels = [est.describe(layout) for _, layout, _, _ in shown]
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.5))
    axes.barh(range(len(shown))[::-1], [r[0] / r[1].gpus for r in shown])
    axes.set_yticks(range(len(shown))[::-1], labels, fontsize=7)
    axes.set_xlabel("predicted tokens/s per GPU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    if args.plot and not args.plan:
        raise SystemExit("error: --plot draws a plan; give --plan N")
    model = build_model(args)
    hw = est.Hardware(gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node, tflops=args.tflops,
                      nvlink_bytes_per_s=args.nvlink_gbps * 1e9, network_bytes_per_s=args.network_gbps * 1e9,
                      host_seconds_per_layer=args.host_ms_per_layer * 1e-3)
    if args.plan:
        global_batch = args.global_batch or args.plan
        results = est.plan(model, args.plan, global_batch, hw, args.precision, objective=args.objective)
        print_plan(results, args.plan, args.top)
        if args.plot:
            plot(results, args.plot, args.top)
        return 0 if results else 1
    print_single(model, build_layout(args), hw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

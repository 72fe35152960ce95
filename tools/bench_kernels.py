"""Check and time Trellis' fused CUDA kernels on a GPU, in one run.

    PYTHONPATH=. python tools/bench_kernels.py --check --out $OUT/kernels.json

Steps: build the extension (timed); with --check, run tests/gpu/test_kernels.py,
test_elementwise_kernels.py and test_fp8_recipes_gpu.py in this process; measure the device
copy bandwidth; time fused vs eager torch vs torch.compile of the same op (forward, and
forward+backward) on large shapes: norms, softmax, FP8 cast, SwiGLU, QKV split + RoPE, and decode
attention against its torch reference (forward only, no compile); sweep the norm backward's
partial-sum grid; time the FP8 weight-gradient GEMM into fp32 against torch's product and
add; list kernels whose registers spilled. Prints markdown tables and writes
everything to the JSON file given by --out.

Bandwidth: "bytes" is the traffic an ideal fused implementation must move (inputs read once,
outputs written once, fp32 per-row statistics, weights); the same figure is used for every
variant, so GB/s compares times. Causal softmax counts full rows although the fused kernel
skips reading keys right of the diagonal, so its GB/s there is an effective figure.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from csrc import fused_ops, loader  # noqa: E402

NOMINAL_COPY_TBPS = 3.0  # H100 SXM copy bandwidth (read + write) quoted in DESIGN.md


# ----------------------------------------------------------------------------- timing


@functools.cache
def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles of torch.cuda._sleep per millisecond, measured once."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / start.elapsed_time(end)


def time_ms(fn, warmup: int, reps: int) -> dict:
    """Median / min GPU milliseconds of fn() over reps, each rep between its own CUDA events.

    The reps are queued behind a GPU sleep longer than the host needs to launch them all, so
    each rep's events bracket device work only. Without it a short op (tens of µs) is timed
    with its host launch cost whenever Python launches slower than the GPU runs it; in a
    training step the host runs ahead of the GPU and that cost is hidden.
    "host_ms_per_call" is the host's launch time per call, for the record; "queued" is False
    when the launches outlasted the sleep, so the times may hold host gaps after all."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host_start = time.perf_counter()
    for _ in range(3):
        fn()
    host_ms = (time.perf_counter() - host_start) * 1e3 / 3
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    queue_ms = min(2 * host_ms * reps + 1.0, 2000.0)
    torch.cuda._sleep(int(queue_ms * _sleep_cycles_per_ms()))
    launch_start = time.perf_counter()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    launch_ms = (time.perf_counter() - launch_start) * 1e3
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    # If launching outlasted the sleep (fn blocks the host, or the launch queue filled up),
    # the later reps may include host gaps again: say so rather than report them as GPU time.
    queued = launch_ms < queue_ms
    if not queued:
        print(f"warning: launching {reps} reps took {launch_ms:.1f} ms, longer than the {queue_ms:.1f} ms "
              "GPU sleep ahead of them: these times may include host launch gaps", file=sys.stderr)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "host_ms_per_call": host_ms,
            "queued": queued}


def copy_bandwidth(warmup: int, reps: int, gib: float = 2.0) -> dict:
    """Device-to-device copy of a large buffer; bytes = read + written."""
    numel = int(gib * 2**30) // 4
    src = torch.empty(numel, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), warmup, reps)
    moved = 2 * numel * 4
    return {"bytes": moved, **timing, "tb_per_s": moved / (timing["median_ms"] * 1e-3) / 1e12}


# ----------------------------------------------------------------------------- cases


def _grad_fn(op, inputs, grad_out):
    wants = [t for t in inputs if t is not None and t.requires_grad]
    return lambda: torch.autograd.grad(op(*inputs), wants, grad_out)


def norm_case(kind: str, rows: int, hidden: int, dtype: torch.dtype) -> dict:
    """Ops and byte counts for RMSNorm ('rms') or LayerNorm with bias ('layer')."""
    eps = 1e-5
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    b = (0.1 * torch.randn(hidden, device="cuda")).to(dtype) if kind == "layer" else None
    dy = torch.randn_like(x)
    if kind == "rms":
        fused = lambda x, w, b: loader.rms_norm(x, w, eps)  # noqa: E731
        eager = lambda x, w, b: loader.rms_norm_reference(x, w, eps)  # noqa: E731
    else:
        fused = lambda x, w, b: loader.layer_norm(x, w, b, eps)  # noqa: E731
        eager = lambda x, w, b: loader.layer_norm_reference(x, w, b, eps)  # noqa: E731
    size = x.element_size()
    tensor_bytes, param_bytes = rows * hidden * size, hidden * w.element_size() * (1 if b is None else 2)
    stats_bytes = rows * 4 * (1 if kind == "rms" else 2)
    forward_bytes = 2 * tensor_bytes + param_bytes + stats_bytes      # x, params -> y, stats
    backward_bytes = 3 * tensor_bytes + 2 * param_bytes + stats_bytes  # dy, x, w, stats -> dx, dw, db
    return {
        "name": f"{'RMSNorm' if kind == 'rms' else 'LayerNorm+bias'} {rows}x{hidden} {str(dtype)[6:]}",
        "inputs": (x, w, b), "grad_out": dy, "fused": fused, "eager": eager,
        "bytes": {"fwd": forward_bytes, "fwd+bwd": forward_bytes + backward_bytes},
        "fused_supported": fused_ops.norm_supported(x, w, b),
    }


def softmax_case(shape, dtype: torch.dtype, masking: str) -> dict:
    """Scale + mask + softmax on [b, h, sq, sk]: masking is 'causal' or 'padding'."""
    b, h, sq, sk = shape
    scores = torch.randn(shape, device="cuda", dtype=dtype)
    dy = torch.randn_like(scores)
    mask = None
    if masking == "padding":
        lengths = torch.randint(sk // 2, sk + 1, (b,), device="cuda")
        mask = (torch.arange(sk, device="cuda")[None, :] >= lengths[:, None]).view(b, 1, 1, sk)
    causal, scale = masking == "causal", sk ** -0.5
    fused = lambda s: loader.scaled_masked_softmax(s, mask, scale, causal)  # noqa: E731
    eager = lambda s: loader.scaled_masked_softmax_reference(s, mask, scale, causal)  # noqa: E731
    tensor_bytes = scores.numel() * scores.element_size()
    mask_bytes = 0 if mask is None else mask.numel()
    return {
        "name": f"softmax {masking} {'x'.join(map(str, shape))} {str(dtype)[6:]}",
        "inputs": (scores,), "grad_out": dy, "fused": fused, "eager": eager,
        "bytes": {"fwd": 2 * tensor_bytes + mask_bytes, "fwd+bwd": 5 * tensor_bytes + mask_bytes},
        "fused_supported": fused_ops.softmax_supported(scores, mask),
    }


def fp8_cast_case(rows: int, cols: int, dtype: torch.dtype) -> dict:
    """FP8 quantisation with current scaling, both layouts (parallel/fp8.py). Forward only.
    Bytes: x read twice (the amax must be known before the cast) and two fp8 copies written."""
    from parallel.fp8 import E4M3, quantize_both_layouts

    x = torch.randn(rows, cols, device="cuda", dtype=dtype)
    return {
        "name": f"fp8 cast both layouts {rows}x{cols} {str(dtype)[6:]}",
        "inputs": (x,), "grad_out": None, "modes": ("fwd",),
        "fused": lambda t: loader.fp8_cast_both_layouts(t, E4M3), "eager": lambda t: quantize_both_layouts(t, E4M3),
        "bytes": {"fwd": x.numel() * (2 * x.element_size() + 2)},
        "fused_supported": loader.fp8_cast_supported(x),
    }


def swiglu_case(tokens: int, f: int, dtype: torch.dtype) -> dict:
    """SwiGLU of the fused fc1 output [tokens, 2 f] (models/fused_elementwise.py). Bytes: the
    forward reads 2 f and writes f per token, the backward reads 2 f + f and writes 2 f."""
    from models.fused_elementwise import fused_swiglu, swiglu

    h = torch.randn(tokens, 2 * f, device="cuda", dtype=dtype)
    part = tokens * f * h.element_size()
    return {
        "name": f"SwiGLU {tokens}x(2x{f}) {str(dtype)[6:]}",
        "inputs": (h,), "grad_out": torch.randn(tokens, f, device="cuda", dtype=dtype),
        "fused": fused_swiglu, "eager": swiglu,
        "bytes": {"fwd": 3 * part, "fwd+bwd": 8 * part},
        "fused_supported": loader.swiglu_supported(h),
    }


def qkv_rope_case(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  per_sample: bool = False) -> dict:
    """QKV split + RoPE of qkv [s, b, (heads + 2 kv_heads) d] into dense q, k, v. Bytes: qkv read
    and q, k, v written each way, plus the fp32 cos/sin tables ([b, s, d] with per_sample: the
    positions of packed samples, restarting at every 512th token here)."""
    from models.fused_elementwise import split_qkv_rope_sbnd
    from models.rope import rope_cache

    qkv = torch.randn(seq, batch, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    positions = (torch.arange(seq, device="cuda") % 512).expand(batch, seq) if per_sample else None
    cos, sin = rope_cache(seq, head_dim, 10000.0, "cuda", positions)
    grads = tuple(torch.randn(seq, batch, n, head_dim, device="cuda", dtype=dtype) for n in (heads, kv_heads, kv_heads))
    moved, tables = 2 * qkv.numel() * qkv.element_size(), 2 * cos.numel() * 4
    return {
        "name": f"QKV split+RoPE s{seq} b{batch} {heads}/{kv_heads} heads d{head_dim} {str(dtype)[6:]}"
                + (", per-sample tables" if per_sample else ""),
        "inputs": (qkv,), "grad_out": grads,
        "fused": lambda x: loader.split_qkv_rope(x, cos, sin, heads, kv_heads),
        "eager": lambda x: split_qkv_rope_sbnd(x, cos, sin, heads, kv_heads, head_dim),
        "bytes": {"fwd": moved + tables, "fwd+bwd": 2 * (moved + tables)},
        "fused_supported": loader.split_qkv_rope_supported(qkv, cos, sin, heads, kv_heads, head_dim),
    }


def decode_attention_case(batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, filled: int,
                          dtype: torch.dtype) -> dict:
    """One graphed decode step's attention over a KV cache of max_len slots, `filled` of them in
    use (the new token's slot the last): the kernel, which reads the filled slots only, against
    its torch reference (index_copy_ and SDPA under the mask over all max_len slots, what a
    captured step ran before). Bytes: the filled slots' keys and values, q and the output."""
    from models.kv_cache import static_decode_attention_reference

    def qkv_view(n):  # [b, n, 1, d] views of [1, b, n, d] storage, as the layers hand them over
        return torch.randn(1, batch, n, head_dim, device="cuda", dtype=dtype).permute(1, 2, 0, 3)

    q, k, v = qkv_view(heads), qkv_view(kv_heads), qkv_view(kv_heads)
    keys, values = (torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    visible = torch.arange(max_len, device="cuda").expand(batch, max_len) < filled
    position = torch.tensor([filled - 1], device="cuda")
    moved = (2 * batch * kv_heads * filled + 2 * batch * heads) * head_dim * q.element_size()
    return {
        "name": f"decode attention b{batch} {heads}/{kv_heads} heads d{head_dim}, {filled} of {max_len} slots "
                f"{str(dtype)[6:]}",
        "inputs": (q, k, v), "grad_out": None, "modes": ("fwd",), "compile": False,
        "fused": lambda *t: loader.decode_attention(*t, keys, values, visible, position),
        "eager": lambda *t: static_decode_attention_reference(*t, keys, values, visible, position),
        "bytes": {"fwd": moved},
        "fused_supported": loader.decode_attention_supported(q, keys),
    }


# The weight-gradient GEMMs of a llama3-8b layer at 4096 tokens: (name, out features, in features).
WEIGHT_GRAD_SHAPES = (("qkv", 6144, 4096), ("attention out", 4096, 4096), ("gate+up", 28672, 4096),
                      ("down", 4096, 14336))


def fp8_weight_grad_rows(warmup: int, reps: int, tokens: int = 4096) -> list[dict]:
    """main_grad (fp32) += g^T x per shape, three ways: the accumulating FP8 GEMM of
    csrc/fp8_gemm.cu; torch._scaled_mm's fp32 product then an add (what FP8 does without it);
    bf16 addmm into the fp32 buffer (the bf16 recipe's GEMM)."""
    rows = []
    for name, fan_out, fan_in in WEIGHT_GRAD_SHAPES:
        g_t = (torch.randn(fan_out, tokens, device="cuda")).to(torch.float8_e5m2)
        x_t = (torch.randn(fan_in, tokens, device="cuda")).to(torch.float8_e4m3fn)
        scale = torch.tensor(1.0, device="cuda")
        g_bf16, x_bf16 = g_t.to(torch.bfloat16), x_t.to(torch.bfloat16).t().contiguous()
        main_grad = torch.zeros(fan_out, fan_in, device="cuda")
        variants = {
            "fp8 GEMM into main_grad": lambda: loader.fp8_gemm_accumulate(g_t, scale, x_t, scale, main_grad),
            "fp8 _scaled_mm + add": lambda: main_grad.add_(torch._scaled_mm(
                g_t, x_t.t(), scale_a=scale, scale_b=scale, out_dtype=torch.float32)),
            "bf16 addmm into main_grad": lambda: torch.addmm(main_grad, g_bf16, x_bf16, out_dtype=torch.float32,
                                                             out=main_grad),
        }
        if not loader.fp8_gemm_accumulate_supported(main_grad):
            del variants["fp8 GEMM into main_grad"]
        for variant, run in variants.items():
            timing = time_ms(run, warmup, reps)
            tflops = 2 * fan_out * fan_in * tokens / (timing["median_ms"] * 1e-3) / 1e12
            rows.append({"shape": f"{name} {fan_out}x{fan_in}, {tokens} tokens", "variant": variant, **timing,
                         "tflops": tflops})
        del g_t, x_t, g_bf16, x_bf16, main_grad
    return rows


def run_case(case: dict, warmup: int, reps: int, with_compile: bool, copy_tbps: float) -> list[dict]:
    rows = []
    variants = {"fused": case["fused"], "eager": case["eager"]}
    for mode in case.get("modes", ("fwd", "fwd+bwd")):
        compiled = [("compile", None)] if with_compile and case.get("compile", True) else []
        for variant, op in list(variants.items()) + compiled:
            if variant == "compile":
                torch._dynamo.reset()  # a fresh, static-shape graph per case and mode
                op = torch.compile(case["eager"], dynamic=False)
            inputs = [t.detach().requires_grad_(mode == "fwd+bwd") if t is not None else None for t in case["inputs"]]
            if mode == "fwd":
                def run(op=op, inputs=inputs):
                    with torch.no_grad():
                        return op(*inputs)
            else:
                run = _grad_fn(op, inputs, case["grad_out"])
            timing = time_ms(run, warmup, reps)
            gbps = case["bytes"][mode] / (timing["median_ms"] * 1e-3) / 1e9
            rows.append({
                "case": case["name"], "mode": mode, "variant": variant, **timing, "bytes": case["bytes"][mode],
                "gb_per_s": gbps, "pct_of_measured_copy": 100 * gbps / (copy_tbps * 1e3),
                "pct_of_3tbps": 100 * gbps / (NOMINAL_COPY_TBPS * 1e3),
                "fused_path_taken": case["fused_supported"] if variant == "fused" else None,
            })
        by_variant = {r["variant"]: r["median_ms"] for r in rows if r["mode"] == mode and r["case"] == case["name"]}
        for r in rows:
            if r["mode"] == mode and r["case"] == case["name"] and r["variant"] == "fused":
                r["speedup_vs_eager"] = by_variant["eager"] / by_variant["fused"]
                if "compile" in by_variant:
                    r["speedup_vs_compile"] = by_variant["compile"] / by_variant["fused"]
    return rows


def sweep_norm_backward_blocks(ext, rows: int, hidden: int, dtype, warmup: int, reps: int) -> list[dict]:
    """Time the LayerNorm backward (dx, dw, db) for several partial-sum grid sizes."""
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    b = torch.randn(hidden, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    _, mean, rstd = ext.norm_forward(x, w, b, 1e-5, False)
    moved = 3 * x.numel() * x.element_size() + 3 * hidden * w.element_size() + 2 * rows * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for blocks in (0, sms, 2 * sms, 4 * sms, 8 * sms, 16 * sms):
        timing = time_ms(lambda: ext.norm_backward(dy, x, w, mean, rstd, True, False, True, blocks=blocks), warmup, reps)
        results.append({"shape": f"{rows}x{hidden}", "blocks": blocks or "auto", **timing,
                        "gb_per_s": moved / (timing["median_ms"] * 1e-3) / 1e9})
    return results


# ----------------------------------------------------------------------------- checks


def run_gpu_tests(junit_path: Path | None) -> dict:
    """Run the kernel tests of tests/gpu in this process; return counts and failure texts."""
    import pytest

    class Collector:
        def __init__(self):
            self.passed, self.skipped, self.failed = 0, 0, []

        def pytest_runtest_logreport(self, report):
            if report.failed:
                self.failed.append({"test": report.nodeid, "phase": report.when, "error": str(report.longrepr)[-3000:]})
            elif report.skipped:
                self.skipped += 1
            elif report.when == "call":
                self.passed += 1

    collector = Collector()
    files = ("test_kernels.py", "test_elementwise_kernels.py", "test_fp8_recipes_gpu.py")
    args = [str(REPO / "tests" / "gpu" / name) for name in files] + ["-q", "-p", "no:cacheprovider", "-rf"]
    if junit_path is not None:
        args.append(f"--junitxml={junit_path}")
    started = time.perf_counter()
    exit_code = pytest.main(args, plugins=[collector])
    return {"exit_code": int(exit_code), "passed": collector.passed, "skipped": collector.skipped,
            "failed": collector.failed, "seconds": time.perf_counter() - started}


def register_usage(module) -> dict:
    """Registers / stack / local memory per kernel from cuobjdump (spills show as LOCAL > 0)."""
    tool = shutil.which("cuobjdump")
    if tool is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        tool = str(Path(cuda_home) / "bin" / "cuobjdump") if (Path(cuda_home) / "bin" / "cuobjdump").exists() else None
    if tool is None:
        return {"error": "cuobjdump not found"}
    text = subprocess.run([tool, "-res-usage", module.__file__], capture_output=True, text=True).stdout
    pattern = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
    kernels = [{"kernel": m.group(1), "registers": int(m.group(2)), "stack": int(m.group(3)),
                "shared": int(m.group(4)), "local": int(m.group(5))} for m in pattern.finditer(text)]
    names = [k["kernel"] for k in kernels]
    if names and shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        for k, name in zip(kernels, demangled):
            k["kernel"] = re.sub(r"\((?!anonymous namespace\)).*", "", name)  # drop the parameter list
    if not kernels:
        return {"error": "could not parse cuobjdump output", "raw": text[:4000]}
    return {"kernels": kernels, "spilling": [k for k in kernels if k["local"] > 0 or k["stack"] > 0]}


# ----------------------------------------------------------------------------- report


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | mode | variant | median ms | GB/s | % measured copy | % of 3.0 TB/s | host ms / call "
             "| fused speed-up vs eager / compile |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speedup = ""
        if r["variant"] == "fused":
            speedup = f"{r['speedup_vs_eager']:.2f}x / " + (f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "-")
            if not r["fused_path_taken"]:
                speedup += " (FALLBACK: reference ran)"
        lines.append(f"| {r['case']} | {r['mode']} | {r['variant']} | {r['median_ms']:.4f} | {r['gb_per_s']:.0f} | "
                     f"{r['pct_of_measured_copy']:.1f} | {r['pct_of_3tbps']:.1f} | {r['host_ms_per_call']:.4f} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON results file (its folder also gets the test report)")
    parser.add_argument("--check", action="store_true", help="run the kernel tests of tests/gpu first")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--quick", action="store_true", help="one shape per op (smoke run)")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma-separated parts of case names to time (e.g. SwiGLU,RoPE); default all")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "command": " ".join([sys.executable] + sys.argv), "arch_flags": loader.cuda_arch_flags(),
        "git_commit": _git_commit(), "kernel_cache": str(loader.kernel_cache_dir()),
    }

    def save():
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2, default=str))

    started = time.perf_counter()
    ext = loader.build_kernels()
    report["build_seconds"] = time.perf_counter() - started
    report["extension"] = ext.__file__
    print(f"# Trellis kernels on {report['device']} (torch {report['torch']}, CUDA {report['cuda']})\n")
    print(f"build/load: {report['build_seconds']:.1f}s  {ext.__file__}", flush=True)
    report["register_usage"] = register_usage(ext)
    spills = report["register_usage"].get("spilling")
    print(f"kernels spilling registers: {spills if spills is not None else report['register_usage'].get('error')}")
    save()

    if args.check:
        junit = args.out.parent / "test_kernels_junit.xml" if args.out is not None else None
        report["gpu_tests"] = run_gpu_tests(junit)
        tests = report["gpu_tests"]
        print(f"\nkernel tests: {tests['passed']} passed, {len(tests['failed'])} failed, "
              f"{tests['skipped']} skipped in {tests['seconds']:.0f}s")
        for failure in tests["failed"][:20]:
            print(f"  FAILED {failure['test']} ({failure['phase']})")
        save()

    copy = copy_bandwidth(args.warmup, args.reps)
    report["copy_bandwidth"] = copy
    print(f"\ndevice copy bandwidth (read + write): {copy['tb_per_s']:.3f} TB/s")

    # Built one at a time (lambdas) so that only one case's tensors are alive.
    cases = [lambda: norm_case("rms", 16384, 4096, torch.bfloat16),
             lambda: norm_case("layer", 16384, 4096, torch.bfloat16),
             lambda: softmax_case((4, 16, 2048, 2048), torch.bfloat16, "causal"),
             lambda: fp8_cast_case(4096, 14336, torch.bfloat16),
             lambda: swiglu_case(8192, 5632, torch.bfloat16),  # llama-1.3b, micro-batch 4 x 2048
             lambda: qkv_rope_case(2048, 4, 16, 16, 128, torch.bfloat16),
             lambda: decode_attention_case(64, 16, 16, 128, 1024, 512, torch.bfloat16),  # llama-1.3b rollout
             lambda: decode_attention_case(64, 32, 8, 128, 1024, 512, torch.bfloat16)]  # llama3-8b rollout
    if not args.quick:
        cases += [lambda: norm_case("rms", 8192, 8192, torch.bfloat16),
                  lambda: norm_case("layer", 8192, 8192, torch.bfloat16),
                  lambda: norm_case("rms", 4096, 16384, torch.bfloat16),
                  lambda: softmax_case((4, 16, 2048, 2048), torch.bfloat16, "padding"),
                  lambda: fp8_cast_case(14336, 4096, torch.bfloat16), lambda: fp8_cast_case(4096, 4096, torch.float32),
                  lambda: swiglu_case(4096, 14336, torch.bfloat16),  # llama3-8b, 4096 tokens
                  lambda: qkv_rope_case(4096, 1, 32, 8, 128, torch.bfloat16),
                  lambda: qkv_rope_case(2048, 4, 16, 16, 128, torch.bfloat16, per_sample=True),  # packed SFT
                  lambda: decode_attention_case(64, 16, 16, 128, 1024, 1024, torch.bfloat16),
                  lambda: decode_attention_case(1, 32, 32, 128, 4096, 2048, torch.bfloat16),
                  lambda: decode_attention_case(64, 32, 8, 128, 1024, 1024, torch.bfloat16),
                  lambda: decode_attention_case(16, 32, 8, 128, 4096, 4096, torch.bfloat16),
                  lambda: decode_attention_case(1, 32, 8, 128, 4096, 2048, torch.bfloat16),
                  lambda: decode_attention_case(16, 64, 8, 128, 2048, 2048, torch.bfloat16),  # llama3-70b's group
                  lambda: decode_attention_case(64, 16, 8, 64, 1024, 1024, torch.bfloat16)]
    report["results"] = []
    wanted = [part for part in args.only.split(",") if part]
    for make_case in cases:
        case = make_case()
        if wanted and not any(part in case["name"] for part in wanted):
            del case
            continue
        print(f"timing {case['name']} ...", flush=True)
        report["results"] += run_case(case, args.warmup, args.reps, not args.no_compile, copy["tb_per_s"])
        del case
        save()
        torch.cuda.empty_cache()
    print("\n" + markdown_table(report["results"]))

    report["fp8_weight_grad"] = (fp8_weight_grad_rows(args.warmup, args.reps)
                                 if torch.cuda.get_device_capability() >= (8, 9) else [])  # FP8 GEMMs need sm89+
    print("\nWeight-gradient GEMMs into fp32 main_grad (llama3-8b layer shapes):\n")
    print("| shape | variant | median ms | TFLOP/s |\n|---|---|---:|---:|")
    for r in report["fp8_weight_grad"]:
        print(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | {r['tflops']:.0f} |")
    save()

    report["norm_backward_block_sweep"] = []
    for rows_, hidden in ((16384, 4096), (8192, 8192)):
        report["norm_backward_block_sweep"] += sweep_norm_backward_blocks(ext, rows_, hidden, torch.bfloat16,
                                                                         args.warmup, args.reps)
    print("\nLayerNorm backward (dx, dw, db; bf16) vs partial-sum grid size:\n")
    print("| shape | blocks | median ms | GB/s |\n|---|---|---:|---:|")
    for r in report["norm_backward_block_sweep"]:
        print(f"| {r['shape']} | {r['blocks']} | {r['median_ms']:.4f} | {r['gb_per_s']:.0f} |")
    save()
    if args.out is not None:
        print(f"\nwrote {args.out}")
    failed = args.check and (report["gpu_tests"]["exit_code"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

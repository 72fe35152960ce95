"""Device time of profiled training steps by kind of kernel: the first table of
`tools/benchmark.py --profile FILE`, above torch.profiler's per-kernel one.

Each kernel the profiler recorded on the GPU is put in the first kind whose pattern its name
matches (GEMM, attention, Trellis's own kernels, optimizer, communication, memory, compiled
Triton code), the rest under "other". The shares say where a step's time goes, and so which
part a speed-up must come from; summed, the rows give the profiler's total device time.
"""
from __future__ import annotations

import re

# (kind, pattern), first match wins; names as torch.profiler reports CUDA kernels.
KINDS = (
    ("Trellis kernels", r"trellis::"),
    # attention before GEMM: FlashAttention-4's kernels are named kernel_cutlass_..._flash_attn...
    ("attention", r"sdpa|fmha|flash|attention|cudnn"),
    ("GEMM", r"nvjet|gemm|gemv|cutlass|xmma|cublas"),
    ("optimizer and foreach", r"adam|lion|multi_tensor_apply"),
    ("communication", r"nccl"),
    ("memset and memcpy", r"memset|memcpy"),
    ("torch.compile (Triton)", r"^triton_"),
)
OTHER = "other (torch elementwise, reductions, indexing)"
_PATTERNS = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS]


def kind_of(kernel_name: str) -> str:
    return next((kind for kind, pattern in _PATTERNS if pattern.search(kernel_name)), OTHER)


def device_kernels(prof) -> list:
    """(name, self device µs, calls) of each GPU kernel, memset and memcpy in a finished
    torch.profiler run. Left out, as in the profiler's own total: events on the CPU, and the GPU
    spans of user annotations (such as Optimizer.step), which cover kernels already counted."""
    from torch.autograd import DeviceType

    return [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def breakdown(kernels) -> list:
    """[(kind, µs, calls)] summed over `kernels` (name, µs, calls), largest first."""
    totals: dict = {}
    for name, micros, calls in kernels:
        kind = kind_of(name)
        time, count = totals.get(kind, (0.0, 0))
        totals[kind] = (time + micros, count + calls)
    return sorted(((kind, time, count) for kind, (time, count) in totals.items()), key=lambda row: -row[1])


def format_breakdown(rows, steps: int) -> str:
    """A markdown table of `breakdown` rows, per step."""
    total = sum(time for _, time, _ in rows)
    if total <= 0:
        return "No GPU kernels were recorded (a CPU run), so there is no breakdown by kind.\n"
    lines = [f"Device time by kind of kernel, {total / steps / 1e3:.1f} ms per step over {steps} steps:", "",
             "| kind | ms per step | share | kernels per step |", "|---|---:|---:|---:|"]
    for kind, time, calls in rows:
        lines.append(f"| {kind} | {time / steps / 1e3:.2f} | {100 * time / total:.1f}% | {calls / steps:.0f} |")
    return "\n".join(lines) + "\n"

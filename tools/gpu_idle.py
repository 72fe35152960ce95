"""Where the GPU idles during training steps, from a torch.profiler chrome trace.

A gap is time with no kernel, memcpy or memset running on the GPU. Each gap is charged to the
device operation that ends it and to the host ops around that operation's launch (innermost
first): a gap before `aten::mm < aten::linear` means the host issued that GEMM late, after the
GPU had run out of work. Gaps shorter than SMALL_GAP_US are counted together as launch spacing.
A second table sums, by kind of device op (tools/kernel_breakdown.py's kinds), the ops, their
device time and the idle time just before them: many short ops of one kind (cuBLAS's memsets,
say) cost their spacing as well as their run time.

    python3 tools/benchmark.py --preset llama-1.3b --global-batch 32 --steps 3 --warmup 2 --idle idle.txt
    python3 tools/gpu_idle.py TRACE.json            (a trace exported by torch.profiler)

The benchmark writes the report to the file named and the trace beside it (FILE.trace.json).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.kernel_breakdown import breakdown, kind_of  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")
# Runtime API calls (cudaLaunchKernel, memcpy) and driver ones (cuLaunchKernel: Triton's kernels).
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
SMALL_GAP_US = 20.0
NAME_WIDTH = 60


def device_events(events: list) -> list:
    return sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e), key=lambda e: e["ts"])


def find_gaps(device: list) -> tuple[float, float, list]:
    """(busy µs, span µs, [(gap µs, the device event after the gap)]) of time-sorted events,
    overlapping ones (several streams) merged."""
    if not device:
        return 0.0, 0.0, []
    busy, end, gaps = 0.0, device[0]["ts"], []
    for event in device:
        if event["ts"] > end:
            gaps.append((event["ts"] - end, event))
        busy += max(0.0, event["ts"] + event["dur"] - max(end, event["ts"]))
        end = max(end, event["ts"] + event["dur"])
    return busy, end - device[0]["ts"], gaps


class HostOps:
    """Host ops per thread, to name the ops a launch happened inside."""

    def __init__(self, events: list):
        self.by_thread = collections.defaultdict(list)
        for e in events:
            if e.get("cat") in HOST_CATEGORIES and "dur" in e:
                self.by_thread[e["tid"]].append(e)
        for ops in self.by_thread.values():
            ops.sort(key=lambda e: e["ts"])
        self.starts = {tid: [e["ts"] for e in ops] for tid, ops in self.by_thread.items()}
        self.longest = {tid: max(e["dur"] for e in ops) for tid, ops in self.by_thread.items()}

    def enclosing(self, ts: float, tid, depth: int = 3) -> list:
        """Names of the `depth` innermost host ops of thread `tid` running at time ts. The later
        an enclosing op started, the deeper it is, so a backward walk meets them innermost first."""
        ops, names = self.by_thread.get(tid, []), []
        for index in range(bisect.bisect_right(self.starts.get(tid, []), ts) - 1, -1, -1):
            if ops[index]["ts"] + self.longest[tid] < ts:
                break  # no op this early lasts until ts
            if ops[index]["ts"] + ops[index]["dur"] >= ts:
                names.append(ops[index]["name"][:NAME_WIDTH])
                if len(names) == depth:
                    break
        return names


def idle_report(events: list, top: int = 15, analysed_gaps: int = 400) -> dict:
    """Busy and idle time of the trace, and the idle time by (next device op, launching host ops)
    for the `analysed_gaps` longest gaps of at least SMALL_GAP_US."""
    device = device_events(events)
    busy, span, gaps = find_gaps(device)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    host = HostOps(events)
    by_cause, counts = collections.Counter(), collections.Counter()
    large = sorted((g for g in gaps if g[0] >= SMALL_GAP_US), key=lambda g: -g[0])
    for gap, event in large[:analysed_gaps]:
        launch = launches.get(event.get("args", {}).get("correlation"))
        context = " < ".join(host.enclosing(launch["ts"], launch["tid"])) if launch else "(launch not traced)"
        cause = (event["name"][:NAME_WIDTH], context or "(outside any traced op)")
        by_cause[cause] += gap
        counts[cause] += 1
    return {
        "by_kind": by_kind(device, gaps),
        "span_ms": span / 1000, "busy_ms": busy / 1000, "idle_ms": (span - busy) / 1000,
        "small_gaps_ms": sum(g for g, _ in gaps if g < SMALL_GAP_US) / 1000,
        "small_gaps": sum(1 for g, _ in gaps if g < SMALL_GAP_US),
        "causes": [{"idle_ms": ms / 1000, "gaps": counts[cause], "next_device_op": cause[0], "launched_in": cause[1]}
                   for cause, ms in by_cause.most_common(top)],
    }


def by_kind(device: list, gaps: list) -> list:
    """[{kind, ops, device_ms, idle_before_ms}] for every kind of device op, most costly first:
    kernel_breakdown's sums by kind, with the idle time before each kind's ops beside them."""
    idle = collections.Counter()
    for gap, event in gaps:
        idle[kind_of(event["name"])] += gap
    rows = [{"kind": kind, "ops": calls, "device_ms": micros / 1000, "idle_before_ms": idle[kind] / 1000}
            for kind, micros, calls in breakdown([(event["name"], event["dur"], 1) for event in device])]
    return sorted(rows, key=lambda row: -(row["device_ms"] + row["idle_before_ms"]))


def format_report(report: dict) -> str:
    if report["span_ms"] == 0:
        return "no GPU activity in the trace (a CUDA run is needed)\n"
    lines = [f"GPU span {report['span_ms']:.1f} ms: busy {report['busy_ms']:.1f} ms, idle {report['idle_ms']:.1f} ms "
             f"({100 * report['idle_ms'] / report['span_ms']:.1f}%)",
             f"gaps under {SMALL_GAP_US:.0f} us (launch spacing): {report['small_gaps']} totalling "
             f"{report['small_gaps_ms']:.1f} ms",
             "", "| idle ms | gaps | next device op | launched inside (innermost first) |", "|---:|---:|---|---|"]
    lines += [f"| {c['idle_ms']:.2f} | {c['gaps']} | {c['next_device_op']} | {c['launched_in']} |"
              for c in report["causes"]]
    lines += ["", "| kind of device op | ops | device ms | idle before them ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['ops']} | {r['device_ms']:.2f} | {r['idle_before_ms']:.2f} |" for r in report["by_kind"]]
    return "\n".join(lines) + "\n"


def trace_steps(step_fn, synchronize, trace_path: str, steps: int = 1) -> list:
    """Run `steps` calls of step_fn under torch.profiler (CPU and CUDA), export the chrome trace
    to trace_path and return its events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn()
        synchronize()
    prof.export_chrome_trace(trace_path)
    return load_events(trace_path)


def load_events(path: str) -> list:
    with open(path) as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a chrome trace exported by torch.profiler")
    parser.add_argument("--top", type=int, default=15, help="causes to list")
    args = parser.parse_args(argv)
    try:
        events = load_events(args.trace)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"error: cannot read a chrome trace from {args.trace!r}: {error}")
    print(format_report(idle_report(events, args.top)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""tools/gpu_idle.py on a hand-made chrome trace: busy and idle time, gaps charged to the op
that ends them and to the host ops its launch ran inside."""
import json

import pytest

from tools import gpu_idle


def kernel(name, ts, dur, correlation, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def host(name, ts, dur, tid=1):
    return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def launch(ts, correlation, tid=1, cat="cuda_runtime"):
    return {"cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
            "args": {"correlation": correlation}}


# GPU: a [0, 100), b [105, 200) (5 us: launch spacing), c [300, 400) after a 100 us gap whose launch
# ran inside aten::mm inside aten::linear; a memcpy [390, 450) overlaps c on another stream; d
# [950, 1000) after a 500 us gap, launched (through the driver API, as Triton does) inside aten::copy_.
EVENTS = [
    kernel("a", 0, 100, 1), kernel("b", 105, 95, 2), kernel("c", 300, 100, 3),
    kernel("Memcpy HtoD", 390, 60, 4, cat="gpu_memcpy"), kernel("d", 950, 50, 5),
    host("aten::linear", 250, 60), host("aten::mm", 280, 20), host("aten::copy_", 900, 45),
    launch(0, 1), launch(1, 2), launch(290, 3), launch(300, 4), launch(940, 5, cat="cuda_driver"),
]


def test_idle_report_charges_gaps_to_their_launch():
    report = gpu_idle.idle_report(EVENTS)
    assert report["span_ms"] == pytest.approx(1.0)
    assert report["busy_ms"] == pytest.approx((100 + 95 + 150 + 50) / 1000)  # c and the memcpy merged
    assert report["idle_ms"] == pytest.approx((5 + 100 + 500) / 1000)
    assert (report["small_gaps"], report["small_gaps_ms"]) == (1, pytest.approx(0.005))
    causes = [(c["next_device_op"], c["launched_in"], c["gaps"]) for c in report["causes"]]
    assert causes == [("d", "aten::copy_", 1), ("c", "aten::mm < aten::linear", 1)]
    text = gpu_idle.format_report(report)
    assert "idle 0.6 ms (60.5%)" in text and "| 0.50 | 1 | d | aten::copy_ |" in text


def test_empty_trace_and_cli(tmp_path, capsys):
    assert "no GPU activity" in gpu_idle.format_report(gpu_idle.idle_report([host("aten::mm", 0, 5)]))
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": EVENTS}))
    assert gpu_idle.main([str(path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "| d | aten::copy_ |" in out and "aten::mm" not in out
    with pytest.raises(SystemExit, match="cannot read a chrome trace"):
        gpu_idle.main([str(tmp_path / "missing.json")])


def test_benchmark_idle_needs_cuda(tmp_path):
    import types

    import torch

    from tools.benchmark import PROFILED_STEPS, extra_steps, parse_cli, write_idle_report

    assert parse_cli(["--idle", "x.txt"])[0].idle == "x.txt"
    assert extra_steps(parse_cli(["--idle", "x.txt", "--profile", "p.txt"])[0]) == PROFILED_STEPS + 1
    assert extra_steps(parse_cli([])[0]) == 0
    with pytest.raises(SystemExit, match="--idle needs a CUDA device"):
        write_idle_report(types.SimpleNamespace(device=torch.device("cpu")), str(tmp_path / "idle.txt"))


def test_idle_before_each_kind_of_device_op():
    # Two memsets before GEMMs: each one's run and the spacing before it are charged to memsets.
    events = [kernel("nvjet_sm90_gemm", 0, 100, 1), kernel("Memset (Device)", 110, 2, 2, cat="gpu_memset"),
              kernel("nvjet_sm90_gemm", 115, 100, 3), kernel("Memset (Device)", 225, 2, 4, cat="gpu_memset"),
              kernel("void trellis::norm_forward_kernel", 230, 20, 5)]
    rows = {row["kind"]: row for row in gpu_idle.idle_report(events)["by_kind"]}
    assert rows["GEMM"]["ops"] == 2 and rows["GEMM"]["device_ms"] == pytest.approx(0.2)
    assert rows["GEMM"]["idle_before_ms"] == pytest.approx(0.003)
    memsets = rows["memset and memcpy"]
    assert (memsets["ops"], memsets["device_ms"], memsets["idle_before_ms"]) == (2, pytest.approx(0.004),
                                                                                  pytest.approx(0.020))
    assert rows["Trellis kernels"]["idle_before_ms"] == pytest.approx(0.003)
    text = gpu_idle.format_report(gpu_idle.idle_report(events))
    assert "| memset and memcpy | 2 | 0.00 | 0.02 |" in text

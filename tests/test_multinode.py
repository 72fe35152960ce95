"""Two "nodes" on this machine: two torchrun launches joined by a c10d rendezvous on localhost,
training the tiny model at TP=2 x DP=2 across them (TP inside a node, DP across). Then the
failure paths: a rank that dies mid-run, and one that hangs, must make every other rank stop
within parallel.timeout_s with one `error: rank R (...): <operation> failed: ...` line each,
and leave no process behind."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(tmp_path, iters, timeout_s=30, env_extra=None, wait_s=150):
    """Start both launches, wait for both; returns (results, elapsed seconds)."""
    port, outputs = free_port(), []
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", tmp_path.name,
               "pretrain_gpt.py", "--data.mock", "true", "--model.preset", "tiny", "--parallel.tp", "2",
               "--train.iters", str(iters), "--train.micro_batch_size", "2", "--train.global_batch_size", "8",
               "--parallel.timeout_s", str(timeout_s), "--train.output_dir", str(tmp_path / "run")]
    env = dict(os.environ, **(env_extra or {}))
    start = time.monotonic()
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    try:
        results = [(node.communicate(timeout=wait_s - (time.monotonic() - start)), node.returncode) for node in nodes]
    finally:
        for node in nodes:  # only if the test failed midway: end what this test started
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return [(out, err, code) for (out, err), code in results], time.monotonic() - start


def leftover_processes(tmp_path) -> list:
    """Processes still running that belong to this test's launches (their command line holds
    the test's own output directory)."""
    marker = str(tmp_path / "run")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def error_lines(results) -> list:
    """Every `error: rank ...` report, wherever it starts in a line. Our reports are whole lines
    (engine.launch.print_line), but the workers and their launcher share one stderr, and any
    other process's unfinished line (Python writes a traceback in pieces) would precede one."""
    return [match.group(0) for _, err, _ in results for match in re.finditer(r"error: rank .*", err)]


def failure_report(results, lines) -> str:
    """What a failed assertion shows, as one string (pytest shortens a tuple's repr): each
    launcher's exit code, the error lines found, the lines of a native crash or of torchrun's
    summary, and the end of each launcher's output."""
    clues = re.compile(r"terminate called|what\(\)|Fatal Python|Signal \d|exitcode|Aborted|Killed")
    parts = [f"launcher exit codes: {[code for _, _, code in results]}", "error lines:", *lines]
    for node, (_, err, _) in enumerate(results):
        parts += [f"--- launcher {node}: crash and summary lines ---",
                  *[line for line in err.splitlines() if clues.search(line)],
                  f"--- launcher {node}: end of stderr ---", err[-1500:]]
    return "\n".join(parts)


WRITER = """
import sys
from engine.launch import print_line
for i in range(300):
    print_line(f"error: rank {sys.argv[1]} line {i} " + "x" * 150)
"""


def test_failure_lines_stay_whole_among_concurrent_writers():
    # Six "ranks" writing into one shared stderr pipe, as the workers of a node do; with print()
    # a line's text and its newline were separate writes, and lines ran together.
    read_end, write_end = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank)], cwd=ROOT, stderr=write_end)
               for rank in range(6)]
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert [writer.wait() for writer in writers] == [0] * 6
    expected = {f"error: rank {rank} line {i} " + "x" * 150 for rank in range(6) for i in range(300)}
    assert len(lines) == len(expected) and set(lines) == expected


SIGTERM_AFTER_FAILURE_LINE = """
import os, signal
from engine import launch
monitor = launch.RunMonitor()
monitor.where, monitor.operation = "rank 2 (tp 0/2, pp 0/1, dp 1/2)", "step 3 forward-backward"
launch.report_termination(monitor)
write = launch.print_line
def write_then_sigterm(text):  # the launcher's SIGTERM lands between the line and the exit
    launch.print_line = write  # once
    write(text)
    os.kill(os.getpid(), signal.SIGTERM)
launch.print_line = write_then_sigterm
launch.report_collective_failure(RuntimeError("Timed out waiting 20000ms for recv operation"), monitor)
"""


def test_sigterm_after_the_failure_line_adds_no_second_line():
    result = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_FAILURE_LINE], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    lines = result.stderr.splitlines()
    assert result.returncode == 3, result.stderr  # the failure's own exit, not the SIGTERM one (143)
    assert lines == ["error: rank 2 (tp 0/2, pp 0/1, dp 1/2): step 3 forward-backward failed: "
                     "Timed out waiting 20000ms for recv operation"], result.stderr


def test_two_nodes_train_tp2_dp2(tmp_path):
    results, _ = launch_two_nodes(tmp_path, iters=4)
    assert [code for _, _, code in results] == [0, 0], [err[-2000:] for _, err, _ in results]
    logged = "".join(out for out, _, _ in results)
    assert "step 4 | loss" in logged  # the logging rank (rank 0) prints every step
    assert not leftover_processes(tmp_path)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_failed_rank_stops_every_rank(tmp_path, mode):
    timeout_s = 20
    results, elapsed = launch_two_nodes(tmp_path, iters=50, timeout_s=timeout_s,
                                        env_extra={"TRELLIS_FAIL_RANK": "1", "TRELLIS_FAIL_STEP": "3",
                                                   "TRELLIS_FAIL_MODE": mode})
    assert all(code != 0 for _, _, code in results)
    lines = error_lines(results)
    # Rank 1 is the failed one; ranks 0, 2 and 3 each name themselves, their grid place and the operation.
    for rank in (0, 2, 3):
        mine = [line for line in lines if line.startswith(f"error: rank {rank} (tp ")]
        assert len(mine) == 1, failure_report(results, lines)
        assert "step 3" in mine[0] and (" failed: " in mine[0] or " interrupted: " in mine[0]), mine
    if mode == "hang":  # the peers only learn of a stuck rank from the collective timeout
        assert any("step 3" in line and "failed" in line for line in lines)
    # startup (two launchers, rendezvous, 2 steps on 2 cores) plus at most the timeout, with margin
    assert elapsed < 60 + timeout_s * 2
    assert not leftover_processes(tmp_path)

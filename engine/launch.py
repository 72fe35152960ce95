"""Entry-point plumbing: turn a user error into one clear line and a non-zero exit.

Under torchrun, a worker that exits non-zero makes the launcher print a page-long traceback of
its own. For errors in the user's input (a bad config, a missing file) that page hides the one
line that matters, so the first worker on each node stops its launcher quietly instead, after
every worker has printed nothing but that line.
"""
from __future__ import annotations

import os
import signal
import sys
import time

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """An error in the user's input; its message is the whole story."""


def _parent_is_torchrun() -> bool:
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"torchrun" in cmdline or b"torch.distributed.run" in cmdline


def print_line(text: str) -> None:
    """Write `text` and its newline to stderr in one write(2), which a pipe keeps whole (up to
    4096 bytes) among other writers. The workers of a node share their launcher's stderr, and
    print() writes the text and the newline separately: ranks failing in the same millisecond
    (a collective timeout ends them together) then ran their reports into one line."""
    try:
        sys.stderr.flush()  # what Python still buffers goes first
    except (OSError, RuntimeError, ValueError):
        pass  # called from a signal handler inside a write to stderr: our line still goes out
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced in-process (a captured test)
        sys.stderr.write(text + "\n")
        return
    data = (text + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]


def report_user_error(error: Exception) -> int:
    """Print `error: ...` once per node and stop the launcher without its traceback."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print_line(f"error: {error}")
        if _parent_is_torchrun():
            os.kill(os.getppid(), signal.SIGKILL)
    return USER_ERROR_EXIT


# ---- distributed failures -------------------------------------------------------------------
# When a rank dies or a collective times out, the others must not hang or print pages of
# tracebacks: each prints one line naming itself and the operation in flight, then leaves at
# once (os._exit: destroying a process group whose peer is gone can block).
COLLECTIVE_ERROR_EXIT = 3
TERMINATED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a terminated process
_COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe",
                     "process group", "collective")


class RunMonitor:
    """Where this process is and what it is doing, for the one-line failure report."""

    def __init__(self):
        self.where = f"rank {os.environ.get('RANK', 0)}"  # replaced by grid coordinates once known
        self.operation = "startup"
        self.reported = False  # this process's one failure line is out (or going out)


def is_collective_failure(error: BaseException) -> bool:
    """Errors of the distributed backends: torch's DistError family, or a RuntimeError that gloo
    or NCCL raised (their messages name the transport, a peer or a timeout)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _COLLECTIVE_WORDS)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def report_collective_failure(error: BaseException, monitor: RunMonitor) -> None:
    """Print `error: rank R (coordinates): <operation> failed: <reason>` and exit now."""
    monitor.reported = True  # a SIGTERM from now on adds no second line (see report_termination)
    print_line(f"error: {monitor.where}: {monitor.operation} failed: {_first_line(error)}")
    os._exit(COLLECTIVE_ERROR_EXIT)


def report_termination(monitor: RunMonitor) -> None:
    """On SIGTERM (torchrun stops a node's workers when one of them fails): one line, then exit.
    A worker whose own failure line is already out leaves that exit to report_collective_failure:
    its peers fail together, so the launcher's SIGTERM can land between that line and the exit."""
    def handler(signum, frame):
        if monitor.reported:
            return
        monitor.reported = True
        print_line(f"error: {monitor.where}: {monitor.operation} interrupted: the launcher terminated this worker "
                   f"(signal {signum}), usually because another worker failed")
        os._exit(TERMINATED_EXIT)
    signal.signal(signal.SIGTERM, handler)


def inject_test_failure(rank: int, step: int) -> None:
    """Test hook: TRELLIS_FAIL_RANK=R TRELLIS_FAIL_STEP=S makes rank R die abruptly (as a crashed
    or killed process would, without cleanup) when step S begins; with TRELLIS_FAIL_MODE=hang it
    stops answering instead (a stuck rank), so its peers' collectives run into the timeout."""
    if os.environ.get("TRELLIS_FAIL_RANK") != str(rank) or os.environ.get("TRELLIS_FAIL_STEP") != str(step):
        return
    mode = os.environ.get("TRELLIS_FAIL_MODE", "exit")
    print_line(f"rank {rank}: TRELLIS_FAIL_RANK hook, {mode} at step {step}")
    if mode == "hang":
        while True:
            time.sleep(3600)
    os._exit(1)

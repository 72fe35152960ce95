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


def report_user_error(error: Exception) -> int:
    """Print `error: ...` once per node and stop the launcher without its traceback."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
        if _parent_is_torchrun():
            os.kill(os.getppid(), signal.SIGKILL)
    return USER_ERROR_EXIT

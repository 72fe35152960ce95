"""Exclusive use of a kernel build folder across processes, safe against a killed build.

`torch.utils.cpp_extension.load` guards its folder with a lock file that it creates and
removes itself, and every later load, cached or not, waits for as long as that file exists. A
build killed from outside (a job's time limit, the OOM killer, SIGKILL) leaves the file behind,
and from then on every process that loads the kernels from that folder waits forever, silently.

Here each load first takes an OS lock (`flock`) on a file of its own in the folder. The kernel
drops that lock when its holder dies, however it dies. While a process holds it, no other
Trellis process is inside torch's load for the folder, so a torch lock file found then is
stale and is removed.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file is all there is
    fcntl = None

logger = logging.getLogger("trellis.kernels")

LOCK_NAME = "trellis_build.lock"
TORCH_LOCK_NAME = "lock"  # the file torch.utils.cpp_extension's FileBaton creates in the build folder


@contextlib.contextmanager
def exclusive_build_dir(build_dir: Path):
    """Hold the folder against other processes for the duration, waiting (and saying so) while
    another one builds or loads; a torch lock file left by a killed process is removed first."""
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(build_dir / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process building or loading the kernels in %s", build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            remove_stale_torch_lock(build_dir)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_torch_lock(build_dir: Path) -> None:
    """Remove torch's lock file; only call with the folder's OS lock held (then it is stale)."""
    stale = build_dir / TORCH_LOCK_NAME
    try:
        stale.unlink()
    except FileNotFoundError:
        return
    logger.warning("removed %s, left by a kernel build that did not finish (the process was killed)", stale)

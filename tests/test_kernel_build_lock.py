"""The kernel build folder's lock (csrc/build_lock.py): a killed build leaves no process waiting
forever, and a build in progress is waited for, not broken into. Real processes."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from csrc.build_lock import LOCK_NAME, TORCH_LOCK_NAME, exclusive_build_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_builder(build_dir, hold_seconds: float):
    """A process that takes the folder, creates torch's lock file as a build would, says
    'ready', and after hold_seconds removes the file and lets go."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from csrc.build_lock import exclusive_build_dir
        folder = Path({str(build_dir)!r})
        with exclusive_build_dir(folder):
            (folder / {TORCH_LOCK_NAME!r}).touch()
            print("ready", flush=True)
            time.sleep({hold_seconds})
            (folder / {TORCH_LOCK_NAME!r}).unlink()
    """)
    builder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "ready"
    return builder


def test_a_lock_file_left_by_a_killed_build_is_removed(tmp_path):
    builder = start_builder(tmp_path, hold_seconds=60)
    builder.send_signal(signal.SIGKILL)  # killed mid-build: torch's lock file stays behind
    builder.wait(timeout=30)
    assert (tmp_path / TORCH_LOCK_NAME).exists()
    started = time.monotonic()
    with exclusive_build_dir(tmp_path):
        assert not (tmp_path / TORCH_LOCK_NAME).exists()
    assert time.monotonic() - started < 5
    assert (tmp_path / LOCK_NAME).exists()  # the folder's own lock file is kept for the next process


def test_a_build_in_progress_is_waited_for_and_its_lock_kept(tmp_path, caplog):
    builder = start_builder(tmp_path, hold_seconds=1.5)
    started = time.monotonic()
    with exclusive_build_dir(tmp_path):
        waited = time.monotonic() - started
        assert builder.poll() is not None or not (tmp_path / TORCH_LOCK_NAME).exists()
    assert builder.wait(timeout=30) == 0  # the builder removed its own lock file: nobody took it away
    assert waited > 0.5
    assert any("waiting for another process" in record.getMessage() for record in caplog.records)


def test_an_unlocked_folder_is_taken_at_once_and_created_if_missing(tmp_path):
    folder = tmp_path / "new" / "cache"
    with exclusive_build_dir(folder):
        assert folder.is_dir()
    with exclusive_build_dir(folder):  # released on exit: a second use does not wait
        pass

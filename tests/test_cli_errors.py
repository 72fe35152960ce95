"""Bad input through the real launcher: one clear line, a non-zero exit, no traceback, no hang."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(nproc, *args, yaml_text=None, tmp_path=None):
    argv = list(args)
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path)] + argv
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               os.path.join(ROOT, "pretrain_gpt.py")] + argv
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("nproc, args, yaml_text, message", [
    (2, [], "train:\n  lrr: 1\ndata:\n  mock: true\n", "unknown key 'train.lrr'"),
    (2, ["--data.mock", "true", "--parallel.tp", "8"], None, "parallel.tp: 8 does not divide model.num_heads=4"),
    (3, ["--data.mock", "true", "--parallel.tp", "2"], None, "world size 3 is not divisible"),
])
def test_bad_input_gives_one_line(tmp_path, nproc, args, yaml_text, message):
    result = launch(nproc, *args, yaml_text=yaml_text, tmp_path=tmp_path)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [error_lines(result.stderr)[0]] and message in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_single_process_bad_input(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--train.iters", "x"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.iters: expected a whole number, got 'x'"

"""tools/layout_parity.py: runs save losses and weights; compare passes a matching layout and
fails one that trained differently."""
import functools
import os
import tempfile

from tests.distributed import run_distributed
from tools import layout_parity

TRAIN_ARGS = ["--model.preset", "tiny", "--data.mock", "true", "--train.iters", "4", "--train.micro_batch_size", "2",
              "--train.global_batch_size", "4", "--train.lr", "3e-3", "--train.device", "cpu", "--log.quiet", "true"]


def run_layout(out: str, *args: str) -> None:
    layout_parity.main(["run", "--out", out, *TRAIN_ARGS, "--train.output_dir", os.path.dirname(out) + "/o", *args])


@functools.lru_cache(maxsize=None)
def runs_dir() -> str:
    """Reference (with init weights), fp32 yardstick, TP=2 and a run with another learning rate."""
    path = tempfile.mkdtemp(prefix="trellis_parity_")
    run_distributed(run_layout, 1, f"{path}/ref.json", "--init", f"{path}/init.pt", "--train.precision", "bf16")
    run_distributed(run_layout, 1, f"{path}/fp32.json", "--train.precision", "fp32")
    run_distributed(run_layout, 2, f"{path}/tp2.json", "--train.precision", "bf16", "--parallel.tp", "2")
    run_distributed(run_layout, 1, f"{path}/lr.json", "--train.precision", "bf16", "--train.lr", "6e-3")
    return path


def test_matching_layout_is_within_tolerance():
    path = runs_dir()
    rows = layout_parity.compare_runs([f"{path}/ref.json", f"{path}/fp32.json", f"{path}/tp2.json"], f"{path}/init.pt")
    assert [row["layout"] for row in rows] == ["1 GPU", "TP=2"]
    assert rows[0]["weight_deviation"] > 0, "bf16 and fp32 should differ: the yardstick would be empty"
    assert rows[1]["within_tolerance"]


def test_different_training_fails_and_compare_exits_nonzero():
    path = runs_dir()
    runs = [f"{path}/ref.json", f"{path}/fp32.json", f"{path}/lr.json"]
    rows = layout_parity.compare_runs(runs, f"{path}/init.pt")
    assert not rows[1]["within_tolerance"]
    assert layout_parity.main(["compare", *runs, "--init", f"{path}/init.pt"]) == 1


def test_checkpoint_reloads_bit_for_bit_at_other_layouts():
    """A TP=2 run's checkpoint, reloaded at PP=2 and on one process (as multi_gpu_runs does on 8
    GPUs): the weights arrive identical and the next step's losses agree."""
    path = tempfile.mkdtemp(prefix="trellis_reload_")
    ckpt = ["--checkpoint.save", f"{path}/ckpt"]
    run_distributed(run_layout, 2, f"{path}/saver.json", "--train.precision", "fp32", "--parallel.tp", "2", *ckpt)
    reloads = []
    for name, world, layout in (("pp2", 2, ["--parallel.pp", "2"]), ("one", 1, [])):
        out = f"{path}/{name}.json"
        run_distributed(run_layout, world, out, "--init", layout_parity.init_path(out), "--train.precision", "fp32",
                        "--train.iters", "5", "--checkpoint.load", f"{path}/ckpt", *layout)
        reloads.append(out)
    rows = layout_parity.compare_reloads(layout_parity.weights_path(f"{path}/saver.json"), reloads)
    assert [row["layout"] for row in rows] == ["PP=2", "1 GPU"]
    assert all(row["identical"] for row in rows)
    assert abs(rows[0]["next_loss"] - rows[1]["next_loss"]) < 1e-5
    assert "| PP=2 | 0.0e+00 | yes |" in layout_parity.format_reloads(rows, "TP=2")

"""Checkpoints: exact resume, resharding across layouts, crash safety and clear errors, on real
gloo processes."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from engine.config import validate
from tests.distributed import run_distributed
from tests.training_harness import tiny_config, train_and_collect

# Dropout on, so a resume that lost the RNG state would give different losses.
DROPOUT = {"dropout": 0.1, "attention_dropout": 0.1}
# 4 KV heads so the same model also runs at TP=4; no dropout, since RNG streams are per layout.
RESHARD_MODEL = {"preset": "tiny", "num_kv_heads": 4}


def losses(overrides: dict, world: int) -> list:
    return run_distributed(train_and_collect, world, overrides, False)[0]["loss"]


RESUME_LAYOUTS = {
    "tp2_dp2": (4, {"parallel": {"tp": 2}}),
    "tp2_pp2_dp2": (8, {"parallel": {"tp": 2, "pp": 2}}),
    "tp2_pp2_dp2_sharded_optimizer": (8, {"parallel": {"tp": 2, "pp": 2}, "optim": {"shard": True}}),
}


@pytest.mark.parametrize("layout", sorted(RESUME_LAYOUTS))
def test_resume_is_bit_exact(layout, tmp_path):
    """6 steps in one go equal 3 steps, a save, a fresh start from the checkpoint and 3 more."""
    world, overrides = RESUME_LAYOUTS[layout]
    base = {**overrides, "model": {"preset": "tiny", **DROPOUT}, "train": {"iters": 6}}
    straight = losses({**base, "checkpoint": {"save": str(tmp_path), "interval": 3}}, world)
    resumed = losses({**base, "checkpoint": {"load": str(tmp_path), "load_step": 3}}, world)
    assert len(straight) == 6 and resumed == straight[3:]


FP8_HISTORY_LAYOUTS = {"tp2": {"parallel": {"tp": 2}}, "pp2_vpp2": {"parallel": {"pp": 2, "vpp": 2}}}


@pytest.mark.parametrize("layout", sorted(FP8_HISTORY_LAYOUTS))
def test_fp8_amax_histories_resume_exactly(layout, tmp_path):
    """FP8 with an amax history: each scale comes from amaxes of earlier steps, so a resume is
    exact only if every rank's histories (per model chunk) come back with the checkpoint. At
    another layout they restart, and the run goes on."""
    base = {**FP8_HISTORY_LAYOUTS[layout], "model": {"preset": "tiny"},
            "train": {"iters": 6, "precision": "fp8", "fp8_amax_history": 4}}
    straight = losses({**base, "checkpoint": {"save": str(tmp_path), "interval": 3}}, 2)
    resumed = losses({**base, "checkpoint": {"load": str(tmp_path), "load_step": 3}}, 2)
    assert len(straight) == 6 and resumed == straight[3:]
    for world, parallel in [(1, {}), (2, {"pp": 2, "vpp": 1})]:  # another layout; another chunking
        elsewhere = losses({**base, "parallel": parallel, "checkpoint": {"load": str(tmp_path), "load_step": 3}}, world)
        assert len(elsewhere) == 3 and all(abs(a - b) < 0.05 * b for a, b in zip(elsewhere, straight[3:]))


RESHARD_SOURCES = {
    "tp2_dp2": (4, {"parallel": {"tp": 2}}),
    "tp2_pp2_dp2": (8, {"parallel": {"tp": 2, "pp": 2}}),
}
RESHARD_TARGETS = [(1, {}), (2, {"parallel": {"tp": 1}}), (4, {"parallel": {"tp": 4}}), (4, {"parallel": {"tp": 1, "pp": 4}})]


@pytest.mark.parametrize("source", sorted(RESHARD_SOURCES))
def test_checkpoint_loads_at_other_layouts(source, tmp_path):
    """Saved after 3 of 4 steps at one layout; the 4th step at another layout gives the
    uninterrupted run's loss."""
    world, overrides = RESHARD_SOURCES[source]
    base = {"model": RESHARD_MODEL, "train": {"iters": 4}}
    straight = losses({**base, **overrides, "checkpoint": {"save": str(tmp_path), "interval": 3}}, world)
    for target_world, target in RESHARD_TARGETS:
        resumed = losses({**base, **target, "checkpoint": {"load": str(tmp_path), "load_step": 3}}, target_world)
        assert len(resumed) == 1, f"resumed at {target} from step 3"
        torch.testing.assert_close(resumed[0], straight[3], rtol=1e-5, atol=0, msg=f"target {target}")


def test_background_saves_hold_the_state_of_their_step(tmp_path):
    """checkpoint.async_save: steps 2, 4 and 6 are copied to host memory and written while the
    next steps train (the second save waits for the first). Training is unchanged, and resuming
    from step 2, whose write overlapped steps 3-4 changing the weights, gives the uninterrupted
    run's losses (TP=2, dropout on, so the generators must come back too)."""
    base = {"parallel": {"tp": 2}, "model": {"preset": "tiny", **DROPOUT}, "train": {"iters": 6}}
    blocking = losses(base, 2)
    root = str(tmp_path)
    saves = {"save": root, "interval": 2, "async_save": True}
    background = losses({**base, "checkpoint": saves}, 2)
    assert background == blocking
    assert sorted(os.listdir(root)) == ["latest", "step_000002", "step_000004", "step_000006"]
    resumed = losses({**base, "checkpoint": {"load": root, "load_step": 2}}, 2)
    assert resumed == blocking[2:]


def test_a_failed_background_write_raises_where_it_is_waited_for():
    """A write that fails in its thread is not lost: the next wait (the next save, the end of
    training, shutdown) raises it, naming the step, and nothing is left in flight."""
    from engine import background_save

    def write():
        raise OSError("No space left on device")

    background_save.start(write, "step 3 to ckpt/step_000003")
    with pytest.raises(RuntimeError, match="step 3 to ckpt/step_000003 failed: No space left on device"):
        background_save.wait_for_pending()
    assert not background_save.in_flight() and background_save.wait_for_pending() is None


@pytest.mark.parametrize("background", [False, True], ids=["blocking", "async_save"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, background):
    """Killed after writing step 4 but before publishing it: step 3 stays the latest and
    loads; the resumed run republishes step 4 and retention keeps the newest two. With
    async_save the kill comes from the writing thread while the main thread waits at the end."""
    root = str(tmp_path)
    base = {"train": {"iters": 4}, "checkpoint": {"save": root, "interval": 1, "keep": 2, "async_save": background}}
    monkeypatch.setenv("TRELLIS_CHECKPOINT_CRASH_BEFORE_RENAME", "4")
    with pytest.raises(RuntimeError, match="produced no result"):
        losses(base, 2)
    assert open(os.path.join(root, "latest")).read().strip() == "step_000003"
    assert sorted(os.listdir(root)) == [".tmp_step_000004", "latest", "step_000002", "step_000003"]
    monkeypatch.delenv("TRELLIS_CHECKPOINT_CRASH_BEFORE_RENAME")
    resumed = losses({**base, "checkpoint": {**base["checkpoint"], "load": root}}, 2)
    assert len(resumed) == 1  # continued from step 3
    assert sorted(os.listdir(root)) == ["latest", "step_000003", "step_000004"]
    assert open(os.path.join(root, "latest")).read().strip() == "step_000004"


def start_error(overrides: dict) -> str:
    """The CheckpointError message a Trainer start gives ('' when it starts)."""
    from engine.checkpoint import CheckpointError
    from engine.training import Trainer, shutdown

    cfg = validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"]))
    try:
        Trainer(cfg)
        message = ""
    except CheckpointError as error:
        message = str(error)
    shutdown()
    return message


def bad_checkpoint_messages(root: str) -> dict:
    """Save one step, then start from a series of broken variants of it (one process)."""
    from engine.training import Trainer, shutdown

    Trainer(validate(tiny_config({"train": {"iters": 1}, "checkpoint": {"save": root}}), 1)).train()
    shutdown()
    step_dir = os.path.join(root, "step_000001")
    messages = {"intact": start_error({"checkpoint": {"load": root}}),
                "other_shape": start_error({"model": {"preset": "tiny", "num_layers": 2}, "checkpoint": {"load": root}}),
                "wrong_step": start_error({"checkpoint": {"load": root, "load_step": 7}}),
                "other_optimizer": start_error({"optim": {"name": "lion"}, "checkpoint": {"load": root}}),
                "other_optimizer_weights_only": start_error({"optim": {"name": "lion"},
                                                             "checkpoint": {"load": root, "load_model_only": True}})}
    data_file = next(os.path.join(step_dir, f) for f in os.listdir(step_dir) if f.endswith(".distcp"))
    with open(data_file, "r+b") as handle:
        handle.truncate(os.path.getsize(data_file) // 2)
    messages["truncated"] = start_error({"checkpoint": {"load": root}})
    os.remove(data_file)
    messages["missing_file"] = start_error({"checkpoint": {"load": root}})
    return messages


def test_bad_checkpoints_fail_with_one_sentence(tmp_path):
    root = str(tmp_path)
    messages = run_distributed(bad_checkpoint_messages, 1, root)[0]
    step_dir = os.path.join(root, "step_000001")
    assert messages["intact"] == ""
    assert "holds a different model: num_layers 4 (checkpoint) vs 2 (this run)" in messages["other_shape"]
    assert "step_000007 does not exist; saved steps are [1]" in messages["wrong_step"]
    assert messages["other_optimizer"] == (f"checkpoint {step_dir} holds adamw optimizer state, but this run uses "
                                           "optim.name lion: resume with --optim.name adamw, or start lion from these "
                                           "weights with --checkpoint.load_model_only true")
    assert messages["other_optimizer_weights_only"] == ""
    for broken in ("truncated", "missing_file"):
        assert messages[broken].startswith(f"could not read checkpoint {step_dir}: a data file is missing or truncated")
        assert "\n" not in messages[broken]


def test_index_that_would_run_code_is_refused(tmp_path):
    """DCP's index is a pickle; ours is read with an allow-list, so this never runs."""
    from engine.checkpoint import CheckpointError, stored_shapes

    with open(tmp_path / ".metadata", "wb") as handle:
        pickle.dump(os.system, handle)
    with pytest.raises(CheckpointError, match="refers to posix.system"):
        stored_shapes(str(tmp_path))

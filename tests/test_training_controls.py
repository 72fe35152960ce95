"""Training controls: freezing by name pattern, the loss-spike guard, early stopping."""
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training_harness import tiny_config


def _trainer(overrides: dict):
    from engine.config import validate
    from engine.training import Trainer

    return Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))


def _weights(trainer) -> dict:
    return {n: p.detach().clone() for c in trainer.model_chunks for n, p in c.named_parameters()}


def frozen_run() -> tuple:
    from engine.training import shutdown

    trainer = _trainer({"train": {"iters": 3, "freeze": ["layers.0.*", "embedding.weight"]}})
    before = _weights(trainer)
    trainable = {id(p) for p in trainer.optimizer.params}
    frozen_in_optimizer = [n for c in trainer.model_chunks for n, p in c.named_parameters()
                           if id(p) in trainable and not p.requires_grad]
    trainer.train()
    after = _weights(trainer)
    shutdown()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return trainer.frozen, changed, set(before), frozen_in_optimizer


def test_frozen_parameters_do_not_change():
    frozen, changed, names, frozen_in_optimizer = run_distributed(frozen_run, 1)[0]
    assert "embedding.weight" in frozen and any(n.startswith("layers.0.") for n in frozen)
    assert not any(n.startswith("layers.1.") for n in frozen)
    assert frozen_in_optimizer == []
    assert changed == names - set(frozen)  # everything else trained


def spike_run() -> dict:
    """Train, then make the guard see a spike: the step must leave weights and optimizer alone."""
    from engine.training import shutdown
    from engine.training_controls import TrainingStopped

    trainer = _trainer({"train": {"iters": 20, "spike_factor": 2.0, "spike_max_skips": 2}})
    records = [trainer.train_step() for _ in range(6)]
    before, updates = _weights(trainer), trainer.optimizer.steps_taken
    trainer.spike_guard.history.extend([records[-1]["loss"] / 10] * 20)  # the next loss looks like a spike
    skipped = trainer.train_step()
    unchanged = all(torch.equal(before[n], w) for n, w in _weights(trainer).items())
    updates_after_skip = trainer.optimizer.steps_taken
    try:
        trainer.train_step()  # still a spike against the lowered mean: second in a row
        stopped = ""
    except TrainingStopped as error:
        stopped = str(error)
    shutdown()
    return {"skipped": skipped, "unchanged": unchanged, "updates": (updates, updates_after_skip), "stopped": stopped}


def test_spike_guard_skips_the_update_and_stops_after_n_in_a_row():
    for result in run_distributed(spike_run, 2):  # two DP ranks: the skip must keep collectives in step
        assert result["skipped"].get("spike_skipped") and result["unchanged"]
        assert result["updates"] == (6, 6)
        assert "2 steps in a row" in result["stopped"]


def test_spike_guard_rules():
    from engine.training_controls import SpikeGuard, TrainingStopped

    guard = SpikeGuard(factor=2.0, max_skips=2, window=3, min_history=3)
    assert not guard.should_skip(100.0, 1)  # too little history to judge
    for step, loss in enumerate([4.0, 3.0, 2.0], start=2):
        assert not guard.should_skip(loss, step)
    assert guard.should_skip(7.0, 5)  # > 2 x mean(4, 3, 2) = 6
    assert not guard.should_skip(5.0, 6)  # resets the run of skips
    assert guard.should_skip(float("nan"), 7)
    with pytest.raises(TrainingStopped, match="2 steps in a row"):
        guard.should_skip(100.0, 8)
    assert not SpikeGuard(0.0, 1).should_skip(1e9, 1)  # off


def early_stop_run() -> tuple:
    import json

    from engine.training import shutdown

    trainer = _trainer({"train": {"iters": 20, "eval_interval": 2, "early_stop_patience": 2, "eval_at_start": True}})
    # At start (not judged), then: best at the 2nd evaluation, then two without gain.
    val_losses = iter([9.0, 5.0, 4.0, 4.5, 4.2, 1.0])
    trainer.evaluate = lambda: next(val_losses)
    history = trainer.train()
    shutdown()
    with open(os.path.join(trainer.cfg.train.output_dir, "metrics.jsonl")) as handle:
        first = json.loads(handle.readline())
    return len(history), first


def test_early_stopping_ends_the_run_after_patience_evaluations():
    steps, first_record = run_distributed(early_stop_run, 1)[0]
    assert steps == 8  # the 4th evaluation (step 8) is the second without gain
    assert first_record == {"step": 0, "val_loss": 9.0}  # train.eval_at_start

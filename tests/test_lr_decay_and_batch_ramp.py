"""Layer-wise LR decay (optim.layer_lr_decay) and batch-size ramp-up (train.batch_ramp)."""
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.training_harness import tiny_config, train_and_collect

DECAY = {"optim": {"layer_lr_decay": 0.5}, "train": {"iters": 4}}
# Global batch 4 for the first 16 samples (4 steps), then 8; a constant LR keeps the schedule
# independent of train.iters, so runs of different lengths can be compared step by step.
RAMP = {"train": {"global_batch_size": 8, "batch_ramp": [4, 4, 16], "lr_schedule": "constant", "warmup_iters": 0,
                  "iters": 6}}


def test_layer_lr_scale_rule():
    from engine.training_controls import layer_lr_scale

    assert layer_lr_scale("layers.0.attn.qkv.weight", 4, 0.5) == 0.5 ** 4
    assert layer_lr_scale("layers.3.mlp.fc2.lora_A", 4, 0.5) == 0.5
    assert layer_lr_scale("embedding.weight", 4, 0.5) == layer_lr_scale("position_embedding", 4, 0.5) == 0.5 ** 5
    assert layer_lr_scale("final_norm.weight", 4, 0.5) == layer_lr_scale("output_weight", 4, 0.5) == 1.0


def decayed_run(overrides: dict) -> dict:
    """Each parameter's learning rate at the first step, then the run's losses and weights."""
    from engine.config import validate
    from engine.training import Trainer, gather_model_state, shutdown

    torch.use_deterministic_algorithms(True)
    trainer = Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))
    trainer.scheduler.apply()
    lr_of = {id(main): group["lr"] for group in trainer.optimizer.param_groups for main in group["params"]}
    lrs = {piece.name: lr_of[id(piece.main)] for piece in trainer.optimizer.pieces}
    history = trainer.train()
    weights = gather_model_state(trainer.model_chunks, trainer.grid)
    shutdown()
    return {"lrs": lrs, "loss": [r["loss"] for r in history], "weights": weights}


def test_layer_lr_decay_sets_group_rates_and_pp2_equals_one_process():
    serial = run_distributed(decayed_run, 1, DECAY)[0]
    first_lr = 3e-3 / 2  # warm-up step 1 of 2
    assert serial["lrs"]["layers.0.attn.qkv.weight"] == pytest.approx(first_lr * 0.5 ** 4)
    assert serial["lrs"]["layers.3.norm2.weight"] == pytest.approx(first_lr * 0.5)
    assert serial["lrs"]["embedding.weight"] == pytest.approx(first_lr * 0.5 ** 5)
    assert serial["lrs"]["output_weight"] == serial["lrs"]["final_norm.weight"] == pytest.approx(first_lr)
    undecayed = run_distributed(train_and_collect, 1, {"train": {"iters": 4}}, False)[0]
    assert serial["loss"][1:] != undecayed["loss"][1:]
    stages = run_distributed(decayed_run, 2, {**DECAY, "parallel": {"pp": 2}})
    assert {**stages[0]["lrs"], **stages[1]["lrs"]} == pytest.approx(serial["lrs"])
    torch.testing.assert_close(torch.tensor(stages[0]["loss"]), torch.tensor(serial["loss"]), rtol=1e-5, atol=1e-6)
    for name, value in serial["weights"].items():
        torch.testing.assert_close(stages[0]["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_ramp_schedule():
    from engine.batches import BatchRamp

    ramp, consumed, batches = BatchRamp(16, (4, 4, 24)), 0, []
    for _ in range(6):
        batches.append(ramp.batch_at(consumed))
        consumed += batches[-1]
    # 8 samples per increment of 4 (Megatron's rule): 4, 4 | 8 | 12 | 16 ...
    assert batches == [4, 4, 8, 12, 16, 16]
    assert BatchRamp(16).batch_at(10 ** 6) == 16


def test_lr_schedule_counts_samples_in_full_batches():
    """Warm-up over 2 full batches of 8: two ramp steps of 4 samples are one full batch."""
    from types import SimpleNamespace

    from engine.lr_schedule import LRScheduler

    cfg = SimpleNamespace(lr=1.0, min_lr=0.0, warmup_iters=2, decay_iters=0, iters=10, lr_schedule="constant",
                          wsd_decay_fraction=0.1, global_batch_size=8)
    optimizer = SimpleNamespace(param_groups=[{}])
    scheduler, lrs = LRScheduler(optimizer, cfg), []
    for batch in (4, 4, 8, 8):
        lrs.append(scheduler.apply())
        scheduler.advance(batch)
    assert lrs == [0.5, 0.75, 1.0, 1.0] and optimizer.param_groups[0]["lr"] == 1.0
    resumed = LRScheduler(optimizer, cfg)
    resumed.load_state_dict(scheduler.state_dict())
    assert (resumed.step_index, resumed.position()) == (4, 3.0)
    resumed.load_state_dict({"step_index": 4})  # a checkpoint from before samples were kept
    assert resumed.position() == 4.0


def ramp_history(overrides: dict) -> list:
    from engine.config import validate
    from engine.training import Trainer, shutdown

    torch.use_deterministic_algorithms(True)
    trainer = Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))
    history = trainer.train()
    shutdown()
    return [(r["loss"], r["global_batch"]) for r in history]


def test_batch_ramp_reads_the_right_samples_and_resumes(tmp_path):
    ramp = run_distributed(ramp_history, 1, {**RAMP, "checkpoint": {"save": str(tmp_path), "interval": 5}})[0]
    assert [batch for _, batch in ramp] == [4, 4, 4, 4, 8, 8]
    # Before the ramp grows, each step is the step of a run at global batch 4: same samples.
    small = run_distributed(train_and_collect, 1, {"train": {**RAMP["train"], "global_batch_size": 4,
                                                             "batch_ramp": [], "iters": 4}}, False)[0]
    torch.testing.assert_close(torch.tensor([loss for loss, _ in ramp[:4]]), torch.tensor(small["loss"]),
                               rtol=1e-6, atol=0)
    # Resumed at DP=2 after step 5 (24 samples consumed): step 6 reads samples 24..31 again.
    resumed = run_distributed(train_and_collect, 2, {**RAMP, "checkpoint": {"load": str(tmp_path), "load_step": 5}}, False)[0]
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor([ramp[5][0]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ramp, world, message", [
    ([4, 4], 1, "give start increment samples"),
    ([2, 4, 16], 2, "multiples of train.micro_batch_size x data-parallel size = 2 x 2"),
    ([4, 3, 16], 1, "multiples of train.micro_batch_size"),
    ([6, 4, 16], 1, "must reach train.global_batch_size"),
])
def test_batch_ramp_config_errors(ramp, world, message):
    from engine.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(tiny_config({"train": {**RAMP["train"], "batch_ramp": ramp}}), world)


def prefetch_checks(overrides: dict) -> list:
    """Which samples each step's batches hold, as the prefetch hands them over."""
    from engine.batches import collate, sample_microbatches
    from engine.config import validate
    from engine.training import PrefetchedBatches, Trainer, shutdown

    trainer = Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))
    micro = trainer.cfg.train.micro_batch_size

    def samples(first, global_batch):
        return sample_microbatches(trainer.train_data, first, global_batch, micro, 0, 1, trainer.device, collate)

    keys = []
    for _ in range(trainer.cfg.train.iters):
        trainer.train_step()
        ready = trainer.prefetched_batches
        keys.append(None if ready is None else (ready.first_sample, ready.global_batch))
        if ready is not None:  # the next step's batches, by content
            assert ready.dataset is trainer.train_data
            for got, want in zip(ready.batches, samples(ready.first_sample, ready.global_batch)):
                assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["labels"], want["labels"])
    # A run moved to other samples (a resume), or given another dataset, ignores batches
    # prepared for different ones.
    trainer.consumed_samples = 8
    for stale in (PrefetchedBatches(trainer.train_data, 999, 4, samples(0, 4)),
                  PrefetchedBatches(object(), 8, 4, samples(0, 4))):
        trainer.prefetched_batches = stale
        assert torch.equal(trainer.train_microbatches(4)[0]["tokens"], samples(8, 4)[0]["tokens"])
    # Data that fails to load leaves nothing prefetched; the next step loads again and reports it.
    trainer.step, trainer.train_data = 0, None
    trainer.prefetch_next_microbatches()
    assert trainer.prefetched_batches is None
    shutdown()
    return keys


def test_next_step_batches_are_prefetched_by_sample():
    """Each step prepares the next one's micro-batches (through the ramp); the last prepares none."""
    keys = run_distributed(prefetch_checks, 1, RAMP)[0]
    assert keys == [(4, 4), (8, 4), (12, 4), (16, 8), (24, 8), None]

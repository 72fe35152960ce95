"""Per-rank drivers for the optimizer tests: train the tiny model step by step and report what
the optimizer did (step stats, buckets launched from backward hooks, gathered state)."""
from __future__ import annotations


def build_trainer(overrides: dict):
    import os

    import torch

    from engine.config import validate
    from engine.training import Trainer
    from tests.training_harness import tiny_config

    torch.use_deterministic_algorithms(True)
    return Trainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))


def finish(trainer, records: list, with_state: bool = False) -> dict:
    import torch

    from engine.training import gather_model_state, shutdown

    trainer.optimizer.finish_param_sync()
    state, reloads_equal = None, None
    if with_state:  # also round-trip it: load keeps this rank's shard, gathering again restores the whole
        state = trainer.optimizer.param_state_by_name()
        trainer.optimizer.load_param_state_by_name(state)
        again = trainer.optimizer.param_state_by_name()
        reloads_equal = all(torch.equal(again[n][k], v) for n, e in state.items() if not n.startswith("__")
                            for k, v in e.items())
    weights = {k: v.float() for k, v in gather_model_state(trainer.model_chunks, trainer.grid).items()}
    shutdown()
    return {"records": records, "loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
            "weights": weights, "state": state,
            "reloads_equal": reloads_equal}


def train_steps(overrides: dict, with_state: bool = False) -> dict:
    """Train train.iters steps; each record also says how many buckets the backward hooks launched."""
    trainer = build_trainer(overrides)
    records = []
    for _ in range(trainer.cfg.train.iters):
        record = trainer.train_step()
        record["launched_in_backward"] = sum(b.launched_in_backward for b in trainer.optimizer.buffers)
        record["buckets"] = sum(len(b.buckets) for b in trainer.optimizer.buffers)
        records.append(record)
    return finish(trainer, records, with_state)


def train_around_bad_step(overrides: dict, bad_step: int, mode: str) -> dict:
    """mode "overflow": at step `bad_step` an inf is written into one gradient (the step must
    be skipped). mode "omit": that step's batch is never trained on (the reference)."""
    import torch

    trainer = build_trainer(overrides)
    # A norm's weight: its gradient arrives in .grad, where a hook can replace it (the linears'
    # and the embedding's go straight into main_grad in their backward).
    records, weight = [], trainer.model.final_norm.weight
    for _ in range(trainer.cfg.train.iters):
        if trainer.step == bad_step and mode == "omit":
            trainer.step += 1
            trainer.consumed_samples += trainer.cfg.train.global_batch_size  # the batch is passed over
            trainer.scheduler.advance()
            continue
        hook = None
        if trainer.step == bad_step:
            hook = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        before = weight.detach().clone()
        record = trainer.train_step()
        record["weights_unchanged"] = bool(torch.equal(before, weight.detach()))
        if hook is not None:
            hook.remove()
        records.append(record)
    return finish(trainer, records)

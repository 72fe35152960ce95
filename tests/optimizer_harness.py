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


# ---- optimizer steps on given gradients (the flat AdamW tests) -----------------------------
def _set_gradients(optimizer, step: int) -> None:
    """Seeded gradients in every main_grad, the same on every rank: large on even steps (the
    0.5 clip triggers), small on odd ones (it does not); the LR warms up then decays."""
    import torch

    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(1000 + step)
    scale = 1.0 if step % 2 == 0 else 1e-4
    for buffer in optimizer.buffers:
        for param in sorted(buffer.names, key=buffer.names.get):
            param.main_grad.copy_(torch.randn(param.shape, generator=generator) * scale)
    lr = 3e-3 * min(1.0, (step + 1) / 2) * 0.8 ** step
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _optimizer_snapshot(optimizer, trainer) -> dict:
    """The gathered masters and moments (param_state_by_name) and the model weights."""
    state = optimizer.param_state_by_name()
    weights = {name: p.detach().float().clone() for name, p in trainer.model.named_parameters()}
    return {"state": state, "weights": weights}


def _restore(trainer, saved, mode: str) -> None:
    """Load what `saved` holds back into the live trainer: its weights, then its optimizer state
    through param_state_by_name's structure or through state_dict (serialised, as a file is)."""
    import io

    import torch

    optimizer = trainer.optimizer
    for buffer, data in zip(optimizer.buffers, saved["param_data"]):
        buffer.param_data.copy_(data)
    if mode == "by_name":
        optimizer.load_param_state_by_name(saved["optimizer"])
    else:
        optimizer.load_state_dict(torch.load(io.BytesIO(saved["optimizer"]), weights_only=True))


def _save(trainer, mode: str) -> dict:
    import copy
    import io

    import torch

    optimizer = trainer.optimizer
    if mode == "by_name":
        state = copy.deepcopy(optimizer.param_state_by_name())
    else:
        state = io.BytesIO()
        torch.save(optimizer.state_dict(), state)
        state = state.getvalue()
    return {"param_data": [b.param_data.clone() for b in optimizer.buffers], "optimizer": state}


def given_gradient_steps(overrides: dict, steps: int, resume_mode: str | None = None, resume_at: int = 3) -> dict:
    """`steps` optimizer steps on _set_gradients' gradients; a snapshot after each. With
    resume_mode ("by_name" or "state_dict") the state after `resume_at` steps is saved, the run
    goes on to the end, then is put back to the saved state and runs the last steps again
    ("again": those snapshots)."""
    from engine.training import shutdown

    trainer = build_trainer(overrides)
    optimizer = trainer.optimizer
    result = {"flat": optimizer.flat is not None, "clipped": [], "snapshots": [], "again": []}
    saved = None
    for step in range(steps):
        if step == resume_at and resume_mode:
            saved = _save(trainer, resume_mode)
        _set_gradients(optimizer, step)
        result["clipped"].append(optimizer.step()["clipped"])
        result["snapshots"].append(_optimizer_snapshot(optimizer, trainer))
    if saved is not None:
        _restore(trainer, saved, resume_mode)
        for step in range(resume_at, steps):
            _set_gradients(optimizer, step)
            optimizer.step()
            result["again"].append(_optimizer_snapshot(optimizer, trainer))
    shutdown()
    return result

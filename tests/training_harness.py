"""Train a tiny model in one rank of a test run and return what the parity tests compare."""
from __future__ import annotations

import functools
import tempfile


def tiny_config(overrides: dict):
    from engine.config import Config, apply_mapping

    cfg = Config()
    base = {
        "model": {"preset": "tiny"},
        "train": {"iters": 10, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_iters": 2,
                  "clip_grad": 0.5, "seed": 7, "precision": "fp32", "device": "cpu",
                  "output_dir": tempfile.mkdtemp(prefix="trellis_test_")},
        "data": {"mock": True},
        "log": {"quiet": True},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    apply_mapping(cfg, base)
    return cfg


def train_and_collect(overrides: dict, gather_weights: bool = True) -> dict:
    """Per-step losses, grad norms and (on request) the full weights gathered from every stage."""
    import os

    import torch

    from engine.config import validate
    from engine.training import gather_model_state, shutdown, trainer_class

    torch.use_deterministic_algorithms(True)
    cfg = validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"]))
    trainer = trainer_class(cfg.train.objective)(cfg)
    history = trainer.train()
    weights = gather_model_state(trainer.model_chunks, trainer.grid) if gather_weights else {}
    shutdown()
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
            "val_loss": [r["val_loss"] for r in history if "val_loss" in r], "weights": weights, "records": history}


@functools.lru_cache(maxsize=None)
def pretrained_base_run() -> tuple:
    """(checkpoint dir, full weights) of the tiny model after 2 training steps, made once per
    test session: the pretrained base that fine-tuning tests start from with finetune.base."""
    from tests.distributed import run_distributed

    path = tempfile.mkdtemp(prefix="trellis_base_")
    result = run_distributed(train_and_collect, 1, {"train": {"iters": 2}, "checkpoint": {"save": path}})[0]
    return path, result["weights"]


def pretrained_base() -> str:
    return pretrained_base_run()[0]

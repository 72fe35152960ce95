"""Precompute DPO reference log-probs once, so DPO runs need no reference model in memory.

    python tools/dpo_reference_logps.py --out runs/dpo_ref --config examples/dpo_tiny.yaml \\
        --checkpoint.load runs/tiny_ckpt
    python pretrain_gpt.py --config examples/dpo_tiny.yaml --checkpoint.load runs/tiny_ckpt \\
        --dpo.reference_logps runs/dpo_ref

Takes the run's own configuration (any layout; start it with torchrun like the run) and
evaluates the weights the run starts from (LoRA adapters off) over every pair of
data.preference_train and data.preference_valid, in data-set order. Writes DIR/train.npz and
DIR/valid.npz: `logps` [pairs, 2] (chosen, rejected summed response log-probs) and a
fingerprint of the tokenized pairs that the run checks (engine/dpo_data.py). `--splits valid`
writes only one of them (e.g. to score a trained checkpoint: examples/dpo_accuracy_by_kind.py).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.config import REFERENCE_FREE_DPO_LOSSES, ConfigError, parse_args, validate  # noqa: E402
from engine.launch import UserError, report_user_error  # noqa: E402


class PaddedView:
    """`base` extended to `length` samples by repeating its last one (whole global batches)."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.base[min(index, len(self.base) - 1)]


def reference_logps_of(trainer, dataset) -> torch.Tensor:
    """[len(dataset), 2] reference log-probs (chosen, rejected) on every rank."""
    g = trainer.grid
    pairs_per_step = trainer.cfg.train.global_batch_size
    steps = -(-len(dataset) // pairs_per_step)
    padded, parts = PaddedView(dataset, steps * pairs_per_step), []
    for step in range(steps):
        batches = trainer.microbatches(padded, step)
        trainer.attach_reference_logps(batches)
        if "reference_logps" in batches[0]:  # the last pipeline stage
            local = torch.cat([b["reference_logps"].view(2, -1).t() for b in batches])
        else:
            local = torch.zeros(pairs_per_step // g.dp, 2, device=trainer.device)
        local = trainer.broadcast_from_last_stage(local.contiguous())
        shares = [torch.empty_like(local) for _ in range(g.dp)]
        torch.distributed.all_gather(shares, local, group=g.dp_group)
        parts.append(torch.cat(shares))
    return torch.cat(parts)[: len(dataset)].cpu()


def take_option(argv: list, name: str, default=None) -> tuple:
    """(value of --name VALUE or --name=VALUE, the other arguments): the tool's own options
    among the configuration's."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1], argv[:index] + argv[index + 2:]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1], argv[:index] + argv[index + 1:]
    if default is None:
        raise ConfigError(f"{name}: give the directory to write train.npz and valid.npz into")
    return default, argv


def write_reference_logps_for(cfg, out: str, splits=("train", "valid")) -> None:
    """Evaluate the run's starting weights over its preference data; rank 0 writes DIR/<split>.npz."""
    from engine.dpo import DPOTrainer
    from engine.dpo_data import reference_file, write_reference_logps
    from engine.training import shutdown

    if cfg.train.objective != "dpo":
        raise ConfigError(f"train.objective: the reference log-probs are for a dpo run, got {cfg.train.objective!r}")
    if cfg.dpo.loss in REFERENCE_FREE_DPO_LOSSES:
        raise ConfigError(f"dpo.loss: {cfg.dpo.loss} uses no reference model, so there are no reference log-probs "
                          "to write")
    cfg.dpo.reference_logps = ""  # compute them, do not read them
    trainer = DPOTrainer(cfg, reference_copy=False)
    for split, data in (("train", trainer.train_data), ("valid", trainer.valid_data)):
        if data is None or split not in splits:
            continue
        logps = reference_logps_of(trainer, data.base)  # the data set itself, not its epochs
        if trainer.grid.rank == 0:
            write_reference_logps(reference_file(out, split), logps.numpy(), data.base)
            print(f"{split}: {len(data.base)} pairs -> {reference_file(out, split)}", flush=True)
    shutdown()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        out, argv = take_option(argv, "--out")
        splits, argv = take_option(argv, "--splits", "train,valid")
        write_reference_logps_for(validate(parse_args(argv), int(os.environ.get("WORLD_SIZE", 1))), out,
                                  splits.split(","))
    except UserError as error:
        return report_user_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())

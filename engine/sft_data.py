"""SFT data for the training loop: chat JSONL -> packed samples indexed globally by step.

engine/data/sft.py renders and packs conversations into samples of model.seq_length (labels
already shifted, loss only on assistant tokens, per-document position and document ids). The
loop indexes samples by step (engine/batches.py), and a fine-tune usually runs several epochs
over a small data set, so `EpochCycle` extends a data set to any length: epoch e visits every
sample once in an order shuffled by (seed, e). The order depends only on the seed, so every
layout and a resumed run see the same samples at the same step. Validation data is cycled
without shuffling, so evaluation always starts at its first sample.
"""
from __future__ import annotations

import numpy as np

from engine.config import ConfigError


class EpochCycle:
    """`base` repeated for `epochs` epochs; each epoch's order is a permutation seeded by (seed, epoch)."""

    def __init__(self, base, epochs: int, seed: int, shuffle: bool = True):
        if len(base) == 0:
            raise ConfigError("the data set holds no samples")
        self.base, self.epochs, self.seed, self.shuffle = base, epochs, seed, shuffle
        self._orders = {}

    def __len__(self) -> int:
        return len(self.base) * self.epochs

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.base)
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                   else np.arange(n))
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is past the {len(self)} samples of {self.epochs} epochs")
        epoch, within = divmod(int(index), len(self.base))
        return self.base[int(self.order(epoch)[within])]


def epochs_needed(samples: int, dataset_size: int) -> int:
    return max(1, -(-samples // dataset_size))


def load_sft_file(path: str, tokenizer, cfg):
    from engine.data.sft import SFTDataset

    return SFTDataset(path, tokenizer, cfg.model.seq_length, pack=cfg.data.sft_packing)


def build_sft_datasets(cfg):
    """(train, valid) SFT datasets long enough for train.iters steps and train.eval_iters batches."""
    d = cfg.data
    return build_epoch_datasets(cfg, lambda tokenizer: (
        load_sft_file(d.sft_train, tokenizer, cfg), load_sft_file(d.sft_valid, tokenizer, cfg) if d.sft_valid else None))


def build_epoch_datasets(cfg, load):
    """(train, valid) from load(tokenizer) -> (train, valid or None) data sets: training repeated
    in shuffled epochs for train.iters steps, validation cycled for train.eval_iters batches."""
    from engine.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({cfg.data.tokenizer})")
    t = cfg.train
    train, valid = load(tokenizer)
    train = EpochCycle(train, epochs_needed(t.iters * t.global_batch_size, len(train)), t.seed)
    if valid is not None:
        valid = EpochCycle(valid, epochs_needed(max(1, t.eval_iters) * t.global_batch_size, len(valid)), t.seed,
                           shuffle=False)
    return train, valid

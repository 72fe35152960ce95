"""Preference pairs for the DPO loop: datasets, micro-batches, and precomputed reference log-probs.

engine/data/preference.py tokenizes each pair into chosen and rejected sequences of
model.seq_length (labels shifted, -100 outside the response). Here they are repeated in epochs
like SFT data (engine/sft_data.py) and stacked per micro-batch as one batch of 2b sequences,
every chosen first and then every rejected, so that both go through one forward.

Precomputed reference log-probs (tools/dpo_reference_logps.py) live in DIR/train.npz and
DIR/valid.npz: `logps` [pairs, 2] (chosen, rejected) in data-set order, and a `fingerprint` of
the tokenized pairs, so a file written for other data or another seq_length is refused
instead of silently misaligned.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from engine.batches import collate, to_device
from engine.config import ConfigError
from engine.data.errors import DataError
from engine.data.preference import RESPONSES, PreferenceDataset
from engine.sft_data import build_epoch_datasets

SPLITS = {"train": "data.preference_train", "valid": "data.preference_valid"}


def reference_file(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.npz")


def load_preference_file(split: str, tokenizer, cfg):
    """The pairs of one split (with their reference log-probs when dpo.reference_logps is set)."""
    key = SPLITS[split]
    try:
        dataset = PreferenceDataset(getattr(cfg.data, key.split(".")[1]), tokenizer, cfg.model.seq_length,
                                    format=cfg.data.preference_format)
    except DataError as error:  # one line through the launcher, naming the key
        raise ConfigError(f"{key}: {error}") from None
    if cfg.dpo.reference_logps:
        logps = read_reference_logps(reference_file(cfg.dpo.reference_logps, split), dataset)
        return WithReferenceLogps(dataset, logps)
    return dataset


def build_preference_datasets(cfg):
    """(train, valid) preference data sets for train.iters steps and train.eval_iters batches."""
    return build_epoch_datasets(cfg, lambda tokenizer: (
        load_preference_file("train", tokenizer, cfg),
        load_preference_file("valid", tokenizer, cfg) if cfg.data.preference_valid else None))


def collate_pairs(samples, device) -> dict:
    """One micro-batch of b pairs as 2b sequences: tokens, labels, loss_mask [2b, s] with the
    chosen responses in rows [0, b) and the rejected in [b, 2b); reference_logps [2b] when precomputed."""
    sequences = [{"tokens": s[f"{name}_tokens"], "labels": s[f"{name}_labels"], "loss_mask": s[f"{name}_loss_mask"]}
                 for name in RESPONSES for s in samples]
    batch = collate(sequences, device)
    if "reference_logps" in samples[0]:
        pairs = np.stack([s["reference_logps"] for s in samples])  # [b, 2]
        batch["reference_logps"] = to_device(torch.from_numpy(pairs.T.reshape(-1).copy()), device)
    return batch


# ---- precomputed reference log-probs -----------------------------------------------------------
def fingerprint(dataset: PreferenceDataset) -> str:
    """Hash of every pair's tokens and labels at the data set's seq_length."""
    digest = hashlib.sha256(str(dataset.seq_length).encode())
    for pair in dataset.pairs:
        for name in RESPONSES:
            for array in pair[name]:
                digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def write_reference_logps(path: str, logps: np.ndarray, dataset: PreferenceDataset) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, logps=np.asarray(logps, dtype=np.float32), fingerprint=np.array(fingerprint(dataset)))
    os.replace(tmp, path)


def read_reference_logps(path: str, dataset: PreferenceDataset) -> np.ndarray:
    if not os.path.isfile(path):
        raise ConfigError(f"dpo.reference_logps: {path} does not exist; write it with tools/dpo_reference_logps.py")
    with np.load(path) as stored:
        logps, stored_print = stored["logps"], str(stored["fingerprint"])
    if logps.shape != (len(dataset), 2) or stored_print != fingerprint(dataset):
        raise ConfigError(f"dpo.reference_logps: {path} was computed for other preference pairs (different data, "
                          f"tokenizer or seq_length); run tools/dpo_reference_logps.py again")
    return logps


class WithReferenceLogps:
    """A preference data set whose samples also carry their reference log-probs [chosen, rejected]."""

    def __init__(self, base: PreferenceDataset, logps: np.ndarray):
        self.base, self.logps = base, logps

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "reference_logps": self.logps[index]}

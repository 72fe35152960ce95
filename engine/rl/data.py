"""Data of the reward and RL objectives: preference pairs for reward-model training, prompt
sources for PPO / GRPO rollouts."""
from __future__ import annotations

import numpy as np
import torch

from engine.batches import to_device
from engine.config import ConfigError
from engine.sft_data import EpochCycle, epochs_needed


def load_tokenizer(cfg):
    from engine.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({cfg.data.tokenizer})")
    return tokenizer


def build_preference_datasets(cfg):
    """(train, valid) pair datasets long enough for the run; valid cycled unshuffled."""
    from engine.data.preference import PreferenceDataset

    tokenizer, t, d = load_tokenizer(cfg), cfg.train, cfg.data

    def load(path):
        dataset = PreferenceDataset(path, tokenizer, cfg.model.seq_length, format=d.preference_format)
        if len(dataset) == 0:
            raise ConfigError(f"{path} holds no preference pairs")
        return dataset

    train = load(d.preference_train)
    train = EpochCycle(train, epochs_needed(t.iters * t.global_batch_size, len(train)), t.seed)
    valid = None
    if d.preference_valid:
        valid = load(d.preference_valid)
        valid = EpochCycle(valid, epochs_needed(max(1, t.eval_iters) * t.global_batch_size, len(valid)), t.seed,
                           shuffle=False)
    return train, valid


def build_rl_datasets(cfg):
    """Reward: preference pairs. PPO / GRPO: the prompt source (no validation set)."""
    if cfg.train.objective == "reward":
        return build_preference_datasets(cfg)
    from engine.rl.tasks import build_task

    return build_task(cfg, load_tokenizer(cfg)), None


def collate_pairs(samples: list, device) -> dict:
    """A micro-batch of n pairs as one batch of 2n sequences, chosen first then rejected, with
    the index of each sequence's last real token (where its reward is read)."""
    tokens, last_index = [], []
    for side in ("chosen", "rejected"):
        for sample in samples:
            tokens.append(sample[f"{side}_tokens"])
            trained = np.nonzero(sample[f"{side}_loss_mask"])[0]
            last_index.append(int(trained[-1]) + 1)  # labels are shifted: the last trained label's token
    return {"tokens": to_device(torch.from_numpy(np.stack(tokens)), device),
            "last_index": to_device(torch.tensor(last_index, dtype=torch.long), device)}

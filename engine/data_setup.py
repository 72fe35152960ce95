"""Building the training and validation datasets from preprocessed `.bin/.idx` files."""
from __future__ import annotations

from engine.config import ConfigError


def parse_weighted_paths(entries: list) -> tuple:
    """`[prefix]` or `[w1, prefix1, w2, prefix2, ...]` -> (prefixes, weights or None)."""
    if len(entries) == 1:
        return list(entries), None
    if len(entries) % 2:
        raise ConfigError("data.path: give one prefix, or pairs of weight and prefix (0.7 a 0.3 b)")
    weights, prefixes = [], []
    for weight, prefix in zip(entries[0::2], entries[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ConfigError(f"data.path: {weight!r} should be a weight before prefix {prefix!r}") from None
        prefixes.append(prefix)
    if any(w <= 0 for w in weights):
        raise ConfigError("data.path: weights must be positive")
    return prefixes, weights


def build_text_datasets(cfg, grid):
    """(train, valid) datasets sized for the whole run: samples are indexed by step."""
    from engine.data.gpt_dataset import build_train_valid_test_datasets

    prefixes, weights = parse_weighted_paths(cfg.data.path)
    t = cfg.train
    num_samples = (t.iters * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size, 0)
    train, valid, _ = build_train_valid_test_datasets(
        prefixes, weights, cfg.data.split, cfg.model.seq_length, t.seed, num_samples,
        cache_dir=cfg.data.cache_dir or None)
    if train is None:
        raise ConfigError(f"data.split: {cfg.data.split!r} leaves no documents for training")
    if t.eval_interval and valid is None:
        raise ConfigError(f"data.split: {cfg.data.split!r} leaves no validation documents but train.eval_interval is set")
    return train, valid

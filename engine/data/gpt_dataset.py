"""Pretraining datasets: fixed-length samples over indexed datasets, split and blended.

`build_train_valid_test_datasets` is what the training loop calls. Each returned dataset
answers `ds[i]` with seq_length+1 int64 tokens; the answer depends only on i and the inputs,
so a run resumed at sample i (step * global_batch + k) reads exactly what an uninterrupted
run would have read there.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from engine.data.errors import DataError
from engine.data.indexed_dataset import IndexedDataset
from engine.data.sample_index import build_blending_indices, load_or_build_indices

SPLIT_NAMES = ("train", "valid", "test")


class GPTDataset:
    """`num_samples` shuffled samples of seq_length+1 tokens over some documents of one dataset."""

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, seq_length: int, seed,
                 num_samples: int, cache_prefix: str, name: str = ""):
        self.indexed = indexed
        self.seq_length = seq_length
        self.num_samples = num_samples
        description = {"dataset": indexed.prefix, "split": name, "documents": [int(documents[0]), int(documents[-1]) + 1]}
        self.doc_idx, self.sample_idx, self.shuffle_idx = load_or_build_indices(
            cache_prefix, indexed.sequence_lengths, documents, seq_length, seed, num_samples, description)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is outside [0, {self.num_samples})")
        j = int(self.shuffle_idx[i])
        (first, start), (last, end) = self.sample_idx[j].tolist(), self.sample_idx[j + 1].tolist()
        get, docs = self.indexed.get, self.doc_idx
        if first == last:
            return get(int(docs[first]), start, end - start + 1).astype(np.int64)
        parts = [get(int(docs[first]), start)]
        parts += [get(int(docs[p])) for p in range(first + 1, last)]
        parts.append(get(int(docs[last]), 0, end + 1))
        return np.concatenate(parts).astype(np.int64)


class BlendedDataset:
    """Samples drawn from several datasets so that every prefix tracks the weights."""

    def __init__(self, datasets: Sequence[GPTDataset], dataset_index: np.ndarray, dataset_sample_index: np.ndarray):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside [0, {len(self)})")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def parse_split(split: str) -> list[float]:
    """"969,30,1" -> normalised fractions for train, valid, test (missing parts are 0)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"Split {split!r} must be up to three non-negative numbers like '969,30,1'.")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_bounds(num_documents: int, fractions: Sequence[float]) -> list[int]:
    """Document boundaries [0, b1, b2, num_documents] from cumulative fractions."""
    cumulative = np.cumsum(fractions)
    bounds = [0] + [int(round(c * num_documents)) for c in cumulative[:-1]] + [num_documents]
    return bounds


def _split_documents(indexed: IndexedDataset, fractions) -> list[np.ndarray]:
    """Sequence ids of each split; splitting is by documents (document_indices in the .idx)."""
    doc_starts = np.asarray(indexed.document_indices)
    bounds = split_bounds(len(doc_starts) - 1, fractions)
    return [np.arange(doc_starts[lo], doc_starts[hi], dtype=np.int64) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _normalised_weights(weights, paths, token_counts) -> np.ndarray:
    if weights is None:
        # No weights: each dataset in proportion to its size, like concatenating them.
        weights = token_counts
    if len(weights) != len(paths):
        raise DataError(f"Got {len(weights)} weights for {len(paths)} datasets; give one weight per dataset.")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise DataError(f"Blending weights {list(weights)} must be non-negative with a positive sum.")
    return w / w.sum()


def _cache_prefix(prefix: str, cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir, os.path.basename(prefix)) if cache_dir else prefix


def _build_split(indexed, documents, paths, weights, seq_length, seed, num_samples, cache_dir, split_i):
    name = SPLIT_NAMES[split_i]
    token_counts = [int(ds.sequence_lengths[docs].sum(dtype=np.int64)) for ds, docs in zip(indexed, documents)]
    w = _normalised_weights(weights, paths, token_counts)
    if len(paths) == 1:
        which = within = None
        counts = [num_samples]
    else:
        which, within = build_blending_indices(w, num_samples)
        counts = np.bincount(which, minlength=len(paths)).tolist()
    parts = []
    for d, (ds, docs, count) in enumerate(zip(indexed, documents, counts)):
        if count and len(docs) == 0:
            raise DataError(f"Dataset {paths[d]} has no documents in its {name} split but is asked for {count} samples.")
        parts.append(GPTDataset(ds, docs, seq_length, (seed, split_i), count, _cache_prefix(paths[d], cache_dir), name)
                     if count else None)
    return parts[0] if which is None else BlendedDataset(parts, which, within)


def build_train_valid_test_datasets(paths, weights, split, seq_length: int, seed: int, num_samples,
                                    cache_dir: Optional[str] = None):
    """(train, valid, test) datasets over the dataset prefixes `paths`; None where a split is empty.

    weights: one float per path (normalised here) or None for weights proportional to size.
    split: document fractions like "969,30,1". num_samples: (train, valid, test) sample counts;
    datasets repeat for as many shuffled epochs as those counts need.
    """
    if not paths:
        raise DataError("No dataset paths were given.")
    if len(num_samples) != 3:
        raise DataError(f"num_samples must be (train, valid, test), got {num_samples!r}.")
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}.")
    fractions = parse_split(split)
    indexed = [IndexedDataset(p) for p in paths]
    per_dataset = [_split_documents(ds, fractions) for ds in indexed]
    result = []
    for split_i in range(3):
        documents = [splits[split_i] for splits in per_dataset]
        if num_samples[split_i] <= 0 or all(len(d) == 0 for d in documents):
            result.append(None)
            continue
        result.append(_build_split(indexed, documents, list(paths), weights, seq_length, seed,
                                   int(num_samples[split_i]), cache_dir, split_i))
    return tuple(result)

"""The pretraining sample index, its C++ builder, its Python twin and its on-disk cache.

Three arrays describe a split of one dataset (documents = sequences of the indexed dataset):

- doc index: the split's document ids, shuffled afresh each epoch, epochs concatenated;
- sample index [n+1, 2]: where sample i starts (position in doc index, token offset) and, in
  row i+1, where it ends. Samples hold seq_length+1 tokens, run across document boundaries
  and overlap by one token (the label of the last position is the input of the next sample),
  as Megatron-LM's GPTDataset does;
- shuffle index: a permutation of the samples. The samples of all full epochs are shuffled
  together and those of the final, partial epoch separately after them, so every full-epoch
  sample is seen before any sample of the final epoch.

The hot loops (`build_sample_idx`, `build_blending_indices`) run in C++ (`csrc/dataset_index.cpp`)
when the extension is built and in the Python twins below otherwise; tests hold them equal.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from csrc.loader import cpp_helpers
from engine.data.errors import DataError

INDEX_FORMAT = "trellis-sample-index-v1"


def build_sample_idx_py(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """Python twin of trellis_cpp.build_sample_idx (same loop, same results)."""
    if seq_length <= 0 or num_samples < 0:
        raise ValueError("seq_length must be positive and num_samples non-negative")
    sizes_list = np.asarray(sizes, dtype=np.int32).tolist()
    doc_list = np.asarray(doc_idx, dtype=np.int64).tolist()
    if not doc_list and num_samples > 0:
        raise IndexError("doc_idx is empty")
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    rows = [(0, 0)]
    doc_pos, doc_offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            doc_left = sizes_list[doc_list[doc_pos]] - doc_offset
            remaining -= doc_left
            if remaining <= 0:
                doc_offset += remaining + doc_left - 1
                remaining = 0
            elif doc_pos + 1 == len(doc_list):
                raise IndexError("documents hold too few tokens for num_samples samples")
            else:
                doc_pos += 1
                doc_offset = 0
        rows.append((doc_pos, doc_offset))
    out[:] = rows
    return out


def build_blending_indices_py(weights, size: int):
    """Python twin of trellis_cpp.build_blending_indices."""
    weights = [float(w) for w in weights]
    taken = [0] * len(weights)
    which = np.zeros(size, dtype=np.int64)
    within = np.zeros(size, dtype=np.int64)
    for i in range(size):
        n = float(max(i, 1))
        best, best_error = 0, weights[0] * n - float(taken[0])
        for d in range(1, len(weights)):
            error = weights[d] * n - float(taken[d])
            if error > best_error:
                best, best_error = d, error
        which[i] = best
        within[i] = taken[best]
        taken[best] += 1
    return which, within


def build_sample_idx(sizes, doc_idx, seq_length: int, num_samples: int, use_cpp: bool = True) -> np.ndarray:
    cpp = cpp_helpers() if use_cpp else None
    if cpp is None:
        return build_sample_idx_py(sizes, doc_idx, seq_length, num_samples)
    return cpp.build_sample_idx(np.asarray(sizes, np.int32), np.asarray(doc_idx, np.int64), seq_length, num_samples)


def build_blending_indices(weights, size: int, use_cpp: bool = True):
    cpp = cpp_helpers() if use_cpp else None
    if cpp is None:
        return build_blending_indices_py(weights, size)
    return cpp.build_blending_indices(np.asarray(weights, np.float64), size)


def samples_in(num_tokens: int, seq_length: int) -> int:
    """Samples that fit in a stream of num_tokens tokens (one token shared between samples)."""
    return max(num_tokens - 1, 0) // seq_length


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    if samples_in(tokens_per_epoch, seq_length) == 0 and num_samples > 0:
        raise DataError(f"The split holds {tokens_per_epoch} tokens, too few for one sample of {seq_length + 1}.")
    epochs = 1
    while samples_in(epochs * tokens_per_epoch, seq_length) < num_samples:
        epochs += 1
    return epochs


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def build_shuffle_idx(total_samples: int, full_epoch_samples: int, rng: np.random.Generator) -> np.ndarray:
    first = rng.permutation(full_epoch_samples)
    last = full_epoch_samples + rng.permutation(total_samples - full_epoch_samples)
    return np.concatenate([first, last]).astype(np.int64)


def build_indices(sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int, num_samples: int,
                  use_cpp: bool = True):
    """(doc_idx, sample_idx, shuffle_idx) for `num_samples` samples over `documents`."""
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.default_rng(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    total = samples_in(num_epochs * tokens_per_epoch, seq_length)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total, use_cpp)
    full_epoch_samples = samples_in((num_epochs - 1) * tokens_per_epoch, seq_length)
    shuffle_idx = build_shuffle_idx(total, full_epoch_samples, rng)
    return doc_idx, sample_idx, shuffle_idx


def cache_key(sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int, num_samples: int) -> str:
    """Hash of everything the index depends on, so any changed input gives a new cache file."""
    h = hashlib.sha256()
    h.update(json.dumps([INDEX_FORMAT, seq_length, seed, num_samples]).encode())
    h.update(np.ascontiguousarray(documents, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(sizes[documents], dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def load_or_build_indices(cache_prefix: str, sizes, documents, seq_length: int, seed: int, num_samples: int,
                          description: dict | None = None):
    """Indices from `<cache_prefix>_<hash>_{doc,sample,shuffle}.npy`, built and saved when absent."""
    key = cache_key(sizes, documents, seq_length, seed, num_samples)
    paths = {name: f"{cache_prefix}_{key}_{name}.npy" for name in ("doc", "sample", "shuffle")}
    if all(os.path.isfile(p) for p in paths.values()):
        return tuple(np.load(paths[name], mmap_mode="r") for name in ("doc", "sample", "shuffle"))
    arrays = build_indices(sizes, documents, seq_length, seed, num_samples)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(cache_prefix)), exist_ok=True)
        for name, array in zip(("doc", "sample", "shuffle"), arrays):
            _save_atomic(paths[name], array)
        desc_path, tmp = f"{cache_prefix}_{key}_desc.json", f"{cache_prefix}_{key}_desc.json.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(description or {}, seq_length=seq_length, seed=seed, num_samples=num_samples), f, indent=1)
        os.replace(tmp, desc_path)
    except OSError as e:
        raise DataError(f"Cannot write the sample index cache at {cache_prefix} ({e.strerror}); pass cache_dir.") from None
    return arrays

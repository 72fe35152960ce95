"""Turning a dataset of token samples into each rank's micro-batches.

Sample indices are global: step `s` consumes samples [s*G, (s+1)*G) of the training set, G the
global batch. DP rank r takes the r-th contiguous 1/DP of them and cuts that into micro-batches.
So the samples seen at a step do not depend on the layout (the parity tests rely on it), and the
data position to resume from is just the step.
"""
from __future__ import annotations

import numpy as np
import torch


class MockDataset:
    """Deterministic random-token samples of seq_length+1 tokens for benchmarks and tests.

    Tokens follow a random Markov chain: each token is, with probability 3/4, a fixed random
    successor of the previous one (one permutation of the vocabulary per seed), else uniform.
    A model can learn the chain quickly, so the loss visibly falls below log(vocab) within a
    few dozen steps, which plain uniform tokens would never show.
    """

    FOLLOW_PROBABILITY = 0.75

    def __init__(self, vocab_size: int, seq_length: int, seed: int, split: int = 0, size: int = 1 << 40):
        self.vocab_size, self.seq_length, self.seed, self.split, self.size = vocab_size, seq_length, seed, split, size
        self.successor = np.random.default_rng([seed, 7919]).permutation(vocab_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        length = self.seq_length + 1
        fresh = rng.integers(0, self.vocab_size, size=length)
        follow = rng.random(length) < self.FOLLOW_PROBABILITY
        # tokens[i] = successor[tokens[i-1]] where follow[i], else fresh[i]. Positions are
        # filled by their depth inside a run of follows, all runs at once: one short numpy
        # step per depth (about 30 at 2k tokens) instead of a Python step per token.
        follow[0] = False
        tokens = fresh.astype(np.int64)
        depth = np.arange(length) - np.maximum.accumulate(np.where(follow, 0, np.arange(length)))
        order = np.argsort(depth, kind="stable")
        bounds = np.searchsorted(depth[order], np.arange(1, depth.max() + 2))
        for level in range(1, depth.max() + 1):
            positions = order[bounds[level - 1]:bounds[level]]
            tokens[positions] = self.successor[tokens[positions - 1]]
        return tokens


def _as_sample(item) -> dict:
    if isinstance(item, dict):
        return item
    return {"tokens": np.asarray(item, dtype=np.int64)}


# Fields of an already-shifted sample (SFT: engine/data/sft.py) that go to the model as they are.
SHIFTED_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


def collate(items, device) -> dict:
    """Stack samples into [b, seq] tensors: tokens, labels, loss_mask (and, for packed samples,
    position_ids and document_ids).

    Two kinds of sample: pretraining samples hold seq+1 tokens (and maybe a loss_mask of the
    same length) and are shifted here, labels being the tokens one ahead; samples that carry
    `labels` (SFT) are already shifted, with seq tokens and -100 where nothing is trained."""
    samples = [_as_sample(item) for item in items]
    if "labels" in samples[0]:
        batch = {key: torch.from_numpy(np.stack([s[key] for s in samples]))
                 for key in SHIFTED_FIELDS if key in samples[0]}
        batch["loss_mask"] = batch["loss_mask"].float()
        # -100 marks untrained positions; the loss mask zeroes them, any valid id will do as the target
        batch["labels"] = batch["labels"].clamp(min=0)
    else:
        full = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
        batch = {"tokens": full[:, :-1], "labels": full[:, 1:]}
        if "loss_mask" in samples[0]:
            batch["loss_mask"] = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]))[:, 1:].float()
        else:
            batch["loss_mask"] = torch.ones_like(batch["labels"], dtype=torch.float32)
    return {k: to_device(v, device) for k, v in batch.items()}


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU batch tensor on `device`. For CUDA it goes through pinned memory, so the copy is
    queued behind the GPU's work instead of holding the host (torch's caching host allocator
    keeps the pinned block until the copy has run)."""
    if torch.device(device).type == "cuda":
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=True)


def step_microbatches(dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                      device, collate_fn=collate) -> list:
    """This DP rank's micro-batches for training step `step` (every step of size global_batch;
    collate_fn stacks one micro-batch)."""
    return sample_microbatches(dataset, step * global_batch, global_batch, micro_batch, dp_rank, dp_size, device,
                               collate_fn)


def sample_microbatches(dataset, first_sample: int, global_batch: int, micro_batch: int, dp_rank: int,
                        dp_size: int, device, collate_fn=collate) -> list:
    """This DP rank's micro-batches of the global batch [first_sample, first_sample + global_batch)."""
    per_rank = global_batch // dp_size
    start = first_sample + dp_rank * per_rank
    if start + per_rank > len(dataset):
        raise IndexError(f"samples up to {start + per_rank - 1} are needed but the dataset has {len(dataset)}")
    return [
        collate_fn([dataset[i] for i in range(first, first + micro_batch)], device)
        for first in range(start, start + per_rank, micro_batch)
    ]


class BatchRamp:
    """The global batch size as a function of consumed samples (Megatron's
    --rampup-batch-size start increment samples): it starts at `start` and grows by `increment`
    after every samples / ((global - start) / increment) consumed samples, then stays at
    `global_batch`. Without a ramp it is always `global_batch`. Steps then consume different
    numbers of samples, so the loop tracks consumed samples (saved in checkpoints) and reads
    the batch [consumed, consumed + batch)."""

    def __init__(self, global_batch: int, ramp=()):
        self.global_batch = global_batch
        self.start, self.increment, self.samples = ramp if ramp else (global_batch, 1, 0)

    def batch_at(self, consumed_samples: int) -> int:
        if self.start >= self.global_batch:
            return self.global_batch
        increments = (self.global_batch - self.start) // self.increment
        samples_per_increment = self.samples / increments
        done = int(consumed_samples / samples_per_increment)
        return min(self.global_batch, self.start + done * self.increment)

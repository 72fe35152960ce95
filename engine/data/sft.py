"""Supervised fine-tuning data: chat JSONL -> fixed-length samples with loss masks.

Each conversation becomes ids plus a mask of trained tokens (see chat.py). Samples have
seq_length positions, already shifted (labels[t] is the target for tokens[t]):

    tokens        int64   input ids (pad_id after the last document)
    labels        int64   next token inside the same document where that token is trained,
                          else -100; never a token of the next document
    loss_mask     float32 1.0 where labels != -100
    position_ids  int64   restart at 0 for every document (and for the padding run)
    document_ids  int64   segment number of each position; padding is the last segment
    cu_seqlens    int32   segment boundaries [0, len1, len1+len2, ..., seq_length]

With packing (the default), conversations are placed in order into sequences while they fit;
attention must stay inside a segment (models/attention.py masks by document_ids; varlen
attention kernels take cu_seqlens). A conversation longer than seq_length is cut to
seq_length and counted in `truncated`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from engine.data.chat import ChatRenderer, messages_from_record, shifted_labels
from engine.data.errors import DataError
from engine.data.jsonl import JsonlReader


class SFTDataset:
    def __init__(self, path: str, tokenizer, seq_length: int, pack: bool = True,
                 chat_template: Optional[str] = None, skip_bad_lines: bool = False):
        if seq_length < 2:
            raise DataError(f"seq_length must be at least 2, got {seq_length}.")
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_id
        renderer = ChatRenderer(tokenizer, chat_template)
        reader = JsonlReader(path, lambda r: renderer.tokenize(messages_from_record(r)), skip_bad_lines)
        self.documents = []  # (ids, labels) per conversation, cut to seq_length
        self.truncated = 0
        for _, (ids, trained) in reader:
            if len(ids) > seq_length:
                ids, trained = ids[:seq_length], trained[:seq_length]
                self.truncated += 1
            self.documents.append((ids, shifted_labels(ids, trained)))
        self.skipped = reader.skipped
        lengths = [len(ids) for ids, _ in self.documents]
        self.packs = pack_in_order(lengths, seq_length) if pack else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        return build_sample([self.documents[d] for d in self.packs[i]], self.seq_length, self.pad_id)


def pack_in_order(lengths: list[int], capacity: int) -> list[list[int]]:
    """Consecutive documents grouped while their total length fits in capacity."""
    packs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > capacity:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def build_sample(documents: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict:
    """One packed sample from (ids, labels) documents whose lengths sum to <= seq_length."""
    lengths = [len(ids) for ids, _ in documents]
    padding = seq_length - sum(lengths)
    segment_lengths = lengths + ([padding] if padding else [])
    tokens = np.concatenate([ids for ids, _ in documents] + [np.full(padding, pad_id, np.int64)])
    labels = np.concatenate([lab for _, lab in documents] + [np.full(padding, -100, np.int64)])
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (labels != -100).astype(np.float32),
        "position_ids": np.concatenate([np.arange(n, dtype=np.int64) for n in segment_lengths]),
        "document_ids": np.repeat(np.arange(len(segment_lengths), dtype=np.int64), segment_lengths),
        "cu_seqlens": np.concatenate([[0], np.cumsum(segment_lengths)]).astype(np.int32),
    }


def collate_packed(samples: list[dict]) -> dict:
    """Batch of samples as torch tensors. Fixed-length fields are stacked; cu_seqlens become
    one int32 vector over the flattened batch (as varlen attention kernels take it), with
    max_seqlen the longest segment."""
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples]))
             for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids")}
    seq_length = samples[0]["tokens"].shape[0]
    bounds = [0]
    for b, s in enumerate(samples):
        bounds += (s["cu_seqlens"][1:].astype(np.int64) + b * seq_length).tolist()
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch["cu_seqlens"] = cu
    batch["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return batch

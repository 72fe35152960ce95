"""Megatron-LM's `.bin/.idx` indexed dataset, byte for byte.

`<prefix>.bin` holds the token ids of every sequence back to back in one dtype.
`<prefix>.idx` is, little-endian:

    magic b"MMIDIDX\\x00\\x00" (9 bytes) | version u64 = 1 | dtype code u8
    | sequence count u64 | document count u64
    | sequence lengths int32[sequence count]
    | sequence pointers int64[sequence count]   (byte offset of each sequence in .bin)
    | document indices int64[document count]    (sequence index where each document
                                                 starts, plus a final entry = sequence count)

Preprocessing here writes one sequence per document, so document indices are 0..n. Files
Megatron wrote with several sequences per document, or with the trailing int8 "mode" array of
its multimodal datasets, read fine.
"""
from __future__ import annotations

import os
import struct
from array import array

import numpy as np

from engine.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dtype_for_vocab(vocab_size: int):
    """The smallest dtype Megatron would pick for ids below vocab_size."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Writes `<prefix>.bin/.idx` through temp files renamed into place on `finalize()`.

    Use as a context manager: an exception inside the block removes the temp files, so a
    failed run never leaves a half-written dataset under the final name.
    """

    def __init__(self, prefix: str, vocab_size: int | None = None, dtype=None):
        if (vocab_size is None) == (dtype is None):
            raise ValueError("Give exactly one of vocab_size or dtype.")
        self.prefix = prefix
        self.dtype = np.dtype(dtype if dtype is not None else dtype_for_vocab(vocab_size))
        self._limit = None if vocab_size is None else vocab_size
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = bin_path(prefix) + suffix
        self._tmp_idx = idx_path(prefix) + suffix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("i")
        self.num_tokens = 0

    def add_document(self, token_ids) -> None:
        ids = np.asarray(token_ids)
        if self._limit is not None and ids.size and (ids.max() >= self._limit or ids.min() < 0):
            raise DataError(f"Token id {int(ids.max())} is outside the vocabulary of size {self._limit}.")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(int(ids.size))
        self.num_tokens += int(ids.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        with open(self._tmp_idx, "wb") as f:
            f.write(index_bytes(lengths, self.dtype))
        # .bin first: a crash between the renames leaves an old .idx that no longer matches,
        # which the reader reports, rather than a new .idx pointing into an old .bin.
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def index_bytes(lengths: np.ndarray, dtype) -> bytes:
    """The whole .idx file for one sequence per document."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)])
    counts = struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices))
    return header + counts + lengths.tobytes() + pointers.tobytes() + document_indices.tobytes()


class IndexedDataset:
    """Memory-mapped reader. `ds[i]` is sequence i as a read-only numpy view."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise DataError(f"Dataset file {path} does not exist.")
        self._read_index(idx_path(prefix))
        self._map_data(bin_path(prefix))

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise DataError(f"{path} is not an indexed-dataset index (bad magic bytes).")
        version, code, seq_count, doc_count = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise DataError(f"{path} has index version {version}; only version {VERSION} is supported.")
        if code not in DTYPE_CODES:
            raise DataError(f"{path} has unknown dtype code {code}.")
        expected = HEADER_BYTES + seq_count * 12 + doc_count * 8
        # Megatron's multimodal datasets append one int8 mode per sequence; it is not needed here.
        if size not in (expected, expected + seq_count):
            raise DataError(f"{path} is {size} bytes but its header describes {expected}; the file is truncated or corrupt.")
        self.dtype = np.dtype(DTYPE_CODES[code])
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(mm, np.int32, seq_count, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(mm, np.int64, seq_count, HEADER_BYTES + seq_count * 4)
        self.document_indices = np.frombuffer(mm, np.int64, doc_count, HEADER_BYTES + seq_count * 12)

    def _map_data(self, path: str) -> None:
        size = os.path.getsize(path)
        n = len(self.sequence_lengths)
        expected = 0 if n == 0 else int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if size != expected:
            raise DataError(
                f"{path} is {size} bytes but {idx_path(self.prefix)} describes {expected}; the .idx does not match its .bin."
            )
        self._data = np.memmap(path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (to its end when length is None)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        return self._data[start : start + length]

    def all_tokens(self) -> np.ndarray:
        """Every token of the .bin, in order, as a read-only memory map."""
        return self._data

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

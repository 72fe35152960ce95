import os

import numpy as np
import pytest

from engine.data.errors import DataError
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter


def random_documents(seed, count, vocab, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, max_len)) for _ in range(count)]


def write(prefix, documents, vocab):
    with IndexedDatasetWriter(str(prefix), vocab_size=vocab) as writer:
        for doc in documents:
            writer.add_document(doc)
        writer.finalize()
    return str(prefix)


@pytest.mark.parametrize("vocab, dtype", [(32000, np.uint16), (65499, np.uint16), (65500, np.int32), (150000, np.int32)])
def test_round_trip_and_dtype_from_vocab(tmp_path, vocab, dtype):
    documents = random_documents(0, 50, vocab) + [np.array([vocab - 1, 0])]
    ds = IndexedDataset(write(tmp_path / "d", documents, vocab))
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(documents)
    assert ds.num_tokens == sum(len(d) for d in documents)
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.get(3, 1, 2), documents[3][1:3])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(documents) + 1))


def test_writer_rejects_ids_outside_vocab_and_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="outside the vocabulary of size 100"):
        write(tmp_path / "d", [np.array([1, 2]), np.array([100])], 100)
    assert os.listdir(tmp_path) == []


def overwrite_magic(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTMAGIC!")


def truncate_idx(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 8)


def grow_bin(prefix):
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")


@pytest.mark.parametrize("damage, message", [
    (overwrite_magic, "bad magic"),
    (truncate_idx, "truncated or corrupt"),
    (grow_bin, "does not match its .bin"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    prefix = write(tmp_path / "d", random_documents(1, 5, 100), 100)
    damage(prefix)
    with pytest.raises(DataError, match=message):
        IndexedDataset(prefix)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="d.idx does not exist"):
        IndexedDataset(str(tmp_path / "d"))

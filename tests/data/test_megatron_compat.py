"""Byte compatibility with Megatron-LM's indexed dataset (megatron-core from PyPI, dev extra)."""
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from engine.data.indexed_dataset import IndexedDataset
from tests.data.test_indexed_dataset import random_documents, write


def load_megatron_indexed_dataset():
    """megatron/core/datasets/indexed_dataset.py, unchanged, without megatron/core/__init__.py.

    Importing megatron.core runs its whole package init (model parallel layers, optimizers,
    Transformer Engine probes: ~15 s here). The indexed dataset module itself needs only two
    small modules and `log_single_rank` from megatron.core.utils, so the parent packages are
    put in place as bare namespaces and utils as a module holding just that function (taken
    from megatron's own _rank_utils). Falls back to the ordinary import if the layout changed.
    """
    spec = importlib.util.find_spec("megatron")
    if spec is None:
        pytest.skip("megatron-core is not installed")
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    before = set(sys.modules)
    try:
        for name in ("megatron", "megatron.core", "megatron.core.datasets"):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(site, *name.split("."))]
            sys.modules[name] = package
        utils = types.ModuleType("megatron.core.utils")
        utils.log_single_rank = importlib.import_module("megatron.core._rank_utils").log_single_rank
        sys.modules["megatron.core.utils"] = utils
        return importlib.import_module("megatron.core.datasets.indexed_dataset")
    except ImportError:
        pass
    finally:
        # Leave no half-built megatron packages behind for other tests.
        for name in set(sys.modules) - before:
            if name.startswith("megatron"):
                del sys.modules[name]
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


megatron_indexed = load_megatron_indexed_dataset()


@pytest.mark.parametrize("vocab", [1000, 100000])
def test_megatron_reads_ours(tmp_path, vocab):
    documents = random_documents(2, 40, vocab)
    prefix = write(tmp_path / "ours", documents, vocab)
    theirs = megatron_indexed.IndexedDataset(prefix)
    assert len(theirs) == len(documents)
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(theirs[i], doc)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(documents) + 1))


@pytest.mark.parametrize("vocab", [1000, 100000])
def test_we_read_megatrons_and_bytes_are_identical(tmp_path, vocab):
    torch = pytest.importorskip("torch")
    documents = random_documents(3, 40, vocab)
    dtype = megatron_indexed.DType.optimal_dtype(vocab)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in documents:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexedDataset(str(tmp_path / "theirs"))
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(ours[i], doc)
    write(tmp_path / "ours", documents, vocab)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()


def test_we_read_megatron_documents_of_several_sequences(tmp_path):
    torch = pytest.importorskip("torch")
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), lengths=[2, 3])
    builder.add_document(torch.tensor([6]), lengths=[1])
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(str(tmp_path / "m"))
    np.testing.assert_array_equal(ours.document_indices, [0, 2, 3])
    assert [ours[i].tolist() for i in range(3)] == [[1, 2], [3, 4, 5], [6]]

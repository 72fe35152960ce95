import numpy as np
import pytest

import engine.data.sample_index as si
from csrc.loader import cpp_helpers

needs_cpp = pytest.mark.skipif(cpp_helpers() is None, reason="trellis_cpp extension not built")


def random_case(seed, num_docs=300, max_len=60):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_len, num_docs).astype(np.int32)  # includes empty documents
    documents = np.arange(num_docs, dtype=np.int64)
    return sizes, documents, rng


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("seq_length", [1, 5, 64, 1000])
@pytest.mark.parametrize("epochs", [1, 3])
def test_cpp_and_python_sample_index_identical(seed, seq_length, epochs):
    sizes, documents, rng = random_case(seed)
    doc_idx = si.build_doc_idx(documents, epochs, rng)
    num_samples = si.samples_in(int(sizes[doc_idx].sum()), seq_length)
    cpp = si.build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_cpp=True)
    py = si.build_sample_idx_py(sizes, doc_idx, seq_length, num_samples)
    assert cpp.dtype == py.dtype == np.int64
    np.testing.assert_array_equal(cpp, py)


@needs_cpp
def test_both_builders_refuse_too_many_samples():
    sizes, documents, _ = random_case(0, num_docs=10)
    too_many = si.samples_in(int(sizes.sum()), 4) + 1
    with pytest.raises(IndexError, match="too few tokens"):
        si.build_sample_idx(sizes, documents, 4, too_many, use_cpp=True)
    with pytest.raises(IndexError, match="too few tokens"):
        si.build_sample_idx_py(sizes, documents, 4, too_many)


def stream_of(sizes, doc_idx):
    """Token positions of the concatenated documents, as (document, offset) pairs."""
    return [(d, o) for d in doc_idx for o in range(sizes[d])]


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
def test_samples_are_overlapping_windows_of_the_document_stream(use_cpp):
    sizes, documents, rng = random_case(5, num_docs=40, max_len=12)
    doc_idx = si.build_doc_idx(documents, 2, rng)
    seq_length = 7
    num_samples = si.samples_in(int(sizes[doc_idx].sum()), seq_length)
    sample_idx = si.build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_cpp)
    stream = stream_of(sizes, doc_idx)
    for i in range(num_samples + 1):
        pos, offset = sample_idx[i]
        # Row i marks token i * seq_length of the stream: consecutive samples share one token.
        assert (int(doc_idx[pos]), int(offset)) == stream[i * seq_length]


@needs_cpp
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0], [0.1, 0.0, 0.9], [1 / 3, 1 / 3, 1 / 3], [0.07, 0.93]])
def test_cpp_and_python_blending_identical(weights):
    cpp = si.build_blending_indices(weights, 5000, use_cpp=True)
    py = si.build_blending_indices_py(weights, 5000)
    for a, b in zip(cpp, py):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
def test_blending_tracks_weights_at_every_prefix(use_cpp):
    weights = np.array([0.5, 0.3, 0.2])
    which, within = si.build_blending_indices(weights, 1000, use_cpp)
    counts = np.zeros(3)
    for n, d in enumerate(which, start=1):
        assert within[n - 1] == counts[d]  # samples of each dataset are taken in order
        counts[d] += 1
        assert np.abs(counts - weights * n).max() <= 1.0
    np.testing.assert_array_equal(counts, [500, 300, 200])  # exact over the full pass


def test_each_epoch_is_a_permutation_and_epochs_differ():
    documents = np.arange(100, 200)
    doc_idx = si.build_doc_idx(documents, 3, np.random.default_rng(0)).reshape(3, 100)
    for epoch in doc_idx:
        np.testing.assert_array_equal(np.sort(epoch), documents)
    assert not np.array_equal(doc_idx[0], doc_idx[1])


def test_full_epochs_are_used_before_the_final_one():
    shuffle = si.build_shuffle_idx(100, 70, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(shuffle[:70]), np.arange(70))
    np.testing.assert_array_equal(np.sort(shuffle[70:]), np.arange(70, 100))


def test_epochs_needed():
    assert si.epochs_needed(101, 10, 10) == 1
    assert si.epochs_needed(101, 10, 11) == 2
    with pytest.raises(si.DataError, match="too few for one sample"):
        si.epochs_needed(5, 10, 1)

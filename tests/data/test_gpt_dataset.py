import os

import numpy as np
import pytest

import engine.data.sample_index as si
from engine.data.errors import DataError
from engine.data.gpt_dataset import build_train_valid_test_datasets, split_bounds
from tests.data.test_indexed_dataset import write

VOCAB = 5000


def make_dataset(path, num_docs=120, seed=0, first_token=0):
    """Documents whose tokens are consecutive numbers, so a sample shows where it came from."""
    rng = np.random.default_rng(seed)
    documents, next_token = [], first_token
    for _ in range(num_docs):
        n = int(rng.integers(1, 30))
        documents.append(np.arange(next_token, next_token + n) % VOCAB)
        next_token += n
    return write(path, documents, VOCAB), documents


def document_of_token(documents):
    return {int(t): i for i, doc in enumerate(documents) for t in doc}


def test_samples_have_seq_length_plus_one_tokens_and_follow_documents(tmp_path):
    prefix, documents = make_dataset(tmp_path / "d")
    train, valid, test = build_train_valid_test_datasets([prefix], None, "1", 16, 1, (300, 10, 10))
    assert valid is None and test is None  # empty splits
    assert len(train) == 300
    owner = document_of_token(documents)
    for i in range(len(train)):
        sample = train[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        for a, b in zip(sample[:-1], sample[1:]):
            # Inside a document tokens count up; a jump is always a document boundary.
            if b != a + 1:
                assert documents[owner[int(a)]][-1] == a and documents[owner[int(b)]][0] == b


def test_splits_are_disjoint_by_document(tmp_path):
    prefix, documents = make_dataset(tmp_path / "d", num_docs=200)
    datasets = build_train_valid_test_datasets([prefix], None, "80,15,5", 8, 1, (200, 50, 20))
    owner = document_of_token(documents)
    bounds = split_bounds(200, [0.8, 0.15, 0.05])
    for split, ds in enumerate(datasets):
        seen = {owner[int(t)] for i in range(len(ds)) for t in ds[i]}
        assert seen <= set(range(bounds[split], bounds[split + 1]))


def test_dataset_is_deterministic_and_resumes_exactly(tmp_path):
    """A run restarted at sample k (new process: indices come from the cache) reads what an
    uninterrupted run reads from k on."""
    prefix, _ = make_dataset(tmp_path / "d")
    args = ([prefix], None, "90,10,0", 16, 7, (500, 20, 0))
    uninterrupted = build_train_valid_test_datasets(*args)[0]
    samples = [uninterrupted[i] for i in range(500)]
    resumed = build_train_valid_test_datasets(*args)[0]
    for i in range(250, 500):
        np.testing.assert_array_equal(resumed[i], samples[i])
    other_seed = build_train_valid_test_datasets([prefix], None, "90,10,0", 16, 8, (500, 20, 0))[0]
    assert any(not np.array_equal(other_seed[i], samples[i]) for i in range(20))


def test_python_twin_gives_the_same_samples(tmp_path, monkeypatch):
    prefix, _ = make_dataset(tmp_path / "d")
    with_cpp = build_train_valid_test_datasets([prefix], None, "1", 16, 3, (400, 0, 0), cache_dir=str(tmp_path / "a"))[0]
    monkeypatch.setattr(si, "cpp_helpers", lambda: None)
    python = build_train_valid_test_datasets([prefix], None, "1", 16, 3, (400, 0, 0), cache_dir=str(tmp_path / "b"))[0]
    for i in range(400):
        np.testing.assert_array_equal(with_cpp[i], python[i])


def test_all_full_epoch_samples_come_before_the_final_epoch(tmp_path):
    prefix, documents = make_dataset(tmp_path / "d", num_docs=30)
    tokens = sum(len(d) for d in documents)
    two_epochs = si.samples_in(2 * tokens, 8)
    train = build_train_valid_test_datasets([prefix], None, "1", 8, 0, (two_epochs + 3, 0, 0))[0]
    used = np.asarray(train.shuffle_idx[: len(train)])
    assert set(range(two_epochs)) <= set(used.tolist())
    assert (used[two_epochs:] >= two_epochs).all()
    # Every token is read once per full epoch, except the tail of the second epoch's stream
    # that is too short for a whole sample.
    counts = np.bincount(np.concatenate([train[i][:-1] for i in range(len(train))]), minlength=tokens)
    assert (counts < 2).sum() <= 2 * tokens - two_epochs * 8


def count_builds(monkeypatch):
    calls = []
    original = si.build_indices

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(si, "build_indices", counting)
    return calls


def test_index_cache_is_reused_and_rebuilt_when_inputs_change(tmp_path, monkeypatch):
    prefix, _ = make_dataset(tmp_path / "d")
    calls = count_builds(monkeypatch)
    build = lambda **kw: build_train_valid_test_datasets(
        [prefix], None, "1", kw.get("seq", 16), kw.get("seed", 1), (kw.get("n", 100), 0, 0))[0]
    first = build()
    assert len(calls) == 1 and any(f.endswith("_shuffle.npy") for f in os.listdir(tmp_path))
    build()
    assert len(calls) == 1  # cached
    build(seed=2), build(seq=8), build(n=101)
    assert len(calls) == 4
    make_dataset(tmp_path / "d", seed=1)  # same prefix, different documents
    rebuilt = build()
    assert len(calls) == 5
    assert not all(np.array_equal(first[i], rebuilt[i]) for i in range(10))


def make_blend(tmp_path, weights, num_samples, seq_length=8):
    prefixes = [make_dataset(tmp_path / f"d{k}", num_docs=60, seed=k, first_token=1000 * k)[0] for k in range(3)]
    train = build_train_valid_test_datasets(prefixes, weights, "1", seq_length, 0, (num_samples, 0, 0))[0]
    return train


def test_blending_hits_weights_exactly_over_a_full_pass(tmp_path):
    train = make_blend(tmp_path, [5, 3, 2], 1000)  # weights are normalised
    assert len(train) == 1000
    source = [int(train[i][0]) // 1000 for i in range(len(train))]  # token ranges tell datasets apart
    assert np.bincount(source).tolist() == [500, 300, 200]
    assert [len(d) for d in train.datasets] == [500, 300, 200]  # each built with its exact count


def test_blending_with_a_zero_weight_never_reads_that_dataset(tmp_path):
    train = make_blend(tmp_path, [0.5, 0.0, 0.5], 200)
    assert train.datasets[1] is None
    assert {int(train[i][0]) // 1000 for i in range(200)} == {0, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1.0, 2.0]), "2 weights for 1 datasets"),
    (dict(weights=[-1.0]), "non-negative"),
    (dict(split="a,b"), "Split 'a,b'"),
    (dict(split="1,1,1,1"), "up to three"),
    (dict(num_samples=(1, 2)), "num_samples must be"),
    (dict(paths=[]), "No dataset paths"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    prefix, _ = make_dataset(tmp_path / "d")
    args = dict(paths=[prefix], weights=None, split="1", seq_length=8, seed=0, num_samples=(10, 0, 0))
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        build_train_valid_test_datasets(**args)


def test_index_out_of_range(tmp_path):
    prefix, _ = make_dataset(tmp_path / "d")
    train = build_train_valid_test_datasets([prefix], None, "1", 8, 0, (10, 0, 0))[0]
    with pytest.raises(IndexError):
        train[10]

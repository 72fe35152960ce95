import numpy as np
import pytest

from engine.data.errors import DataError
from engine.data.preference import PreferenceDataset
from tests.data.conftest import write_jsonl

PAIR = {"prompt": "Name a prime.", "chosen": "7", "rejected": "It is 8."}
MESSAGE_PAIR = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "It is 8."}],
}


def trained_text(tokenizer, sample, name):
    labels = sample[f"{name}_labels"]
    return tokenizer.decode(labels[labels != -100])


def check_shared_prompt(sample):
    p = sample["prompt_length"]
    np.testing.assert_array_equal(sample["chosen_tokens"][:p], sample["rejected_tokens"][:p])
    for name in ("chosen", "rejected"):
        # Position p-1 predicts the first response token; everything before predicts prompt tokens.
        assert (sample[f"{name}_labels"][: p - 1] == -100).all()
        assert sample[f"{name}_labels"][p - 1] == sample[f"{name}_tokens"][p]
        np.testing.assert_array_equal(sample[f"{name}_loss_mask"], sample[f"{name}_labels"] != -100)


@pytest.mark.parametrize("record", [PAIR, MESSAGE_PAIR], ids=["text", "messages-without-prompt"])
def test_chat_pairs_share_the_prompt_and_train_only_responses(tmp_path, sp_tokenizer, record):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    sample = PreferenceDataset(path, sp_tokenizer, seq_length=96)[0]
    check_shared_prompt(sample)
    assert trained_text(sp_tokenizer, sample, "chosen") == "7<|im_end|>"
    assert trained_text(sp_tokenizer, sample, "rejected") == "It is 8.<|im_end|>"
    prompt = sp_tokenizer.decode(sample["chosen_tokens"][: sample["prompt_length"]])
    assert prompt.endswith("<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n")
    assert sample["chosen_tokens"].shape == sample["rejected_labels"].shape == (96,)


def test_earlier_assistant_turns_of_the_prompt_are_not_trained(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [MESSAGE_PAIR])
    sample = PreferenceDataset(path, sp_tokenizer, seq_length=96)[0]
    assert "Hello!" not in trained_text(sp_tokenizer, sample, "chosen")


def test_text_format_appends_eod(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR])
    sample = PreferenceDataset(path, sp_tokenizer, seq_length=48, format="text")[0]
    check_shared_prompt(sample)
    prompt_ids = sp_tokenizer.encode("Name a prime.")
    assert sample["prompt_length"] == len(prompt_ids)
    chosen = sample["chosen_labels"][sample["chosen_labels"] != -100].tolist()
    assert chosen == sp_tokenizer.encode("7") + [sp_tokenizer.eod_id]


def test_long_response_is_cut_and_counted(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [dict(PAIR, rejected="no " * 50)])
    ds = PreferenceDataset(path, sp_tokenizer, seq_length=40)
    assert ds.truncated == 1 and ds[0]["rejected_tokens"].shape == (40,)


@pytest.mark.parametrize("record, problem", [
    (dict(PAIR, prompt="word " * 100), r"has a prompt of \d+ tokens, leaving no room for a response within seq_length 64"),
    (dict(PAIR, chosen="  "), "has an empty 'chosen' response"),
    ({"prompt": "x", "chosen": "y"}, "has no 'rejected' field"),
    (dict(PAIR, rejected=5), "has a 'rejected' field that is neither text nor messages"),
    (dict(PAIR, chosen=[{"role": "user", "content": "y"}]), "has a 'chosen' response that is not from the assistant"),
])
def test_bad_pairs(tmp_path, sp_tokenizer, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIR, record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: line {problem}"):
        PreferenceDataset(path, sp_tokenizer, seq_length=64)
    assert len(PreferenceDataset(path, sp_tokenizer, seq_length=64, skip_bad_lines=True)) == 1


def test_unknown_format(tmp_path, sp_tokenizer):
    with pytest.raises(DataError, match="format 'xml' is unknown"):
        PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", [PAIR]), sp_tokenizer, 64, format="xml")

import json
import shutil

import numpy as np
import pytest
import torch

from engine.data.errors import DataError
from engine.data.sft import SFTDataset, collate_packed
from models.attention import document_causal_mask
from engine.data.tokenizer import build_tokenizer
from tests.data.conftest import write_jsonl

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]}
INSTRUCTION = {"instruction": "Reverse the list.", "input": "[1, 2]", "output": "[2, 1]"}


def expected_chatml(tokenizer, messages):
    """Ids and trained flags of the built-in template, assembled independently of chat.py."""
    ids, trained = [], []
    for m in messages:
        for text, is_trained in ((f"<|im_start|>{m['role']}\n", False),
                                 (m["content"] + "<|im_end|>", m["role"] == "assistant"), ("\n", False)):
            piece = tokenizer.encode(text)
            ids += piece
            trained += [is_trained] * len(piece)
    return np.array(ids), np.array(trained)


def check_document(sample, start, ids, trained):
    """Positions [start, start+len) hold this document, with labels shifted inside it."""
    end = start + len(ids)
    np.testing.assert_array_equal(sample["tokens"][start:end], ids)
    np.testing.assert_array_equal(sample["position_ids"][start:end], np.arange(len(ids)))
    for t in range(start, end):
        k = t - start
        want = ids[k + 1] if k + 1 < len(ids) and trained[k + 1] else -100
        assert sample["labels"][t] == want, f"position {t}"
        assert sample["loss_mask"][t] == (want != -100)


def test_builtin_template_masks_all_but_assistant_turns(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    ds = SFTDataset(path, sp_tokenizer, seq_length=128, pack=False)
    sample = ds[0]
    ids, trained = expected_chatml(sp_tokenizer, CHAT["messages"])
    check_document(sample, 0, ids, trained)
    targets = sample["labels"][sample["labels"] != -100]
    assert sp_tokenizer.decode(targets) == "4<|im_end|>It is 6.<|im_end|>"
    n = len(ids)
    assert (sample["tokens"][n:] == sp_tokenizer.pad_id).all() and (sample["labels"][n:] == -100).all()
    np.testing.assert_array_equal(sample["cu_seqlens"], [0, n, 128])


def test_instruction_format(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "i.jsonl", [INSTRUCTION, dict(INSTRUCTION, input="", system="S")])
    ds = SFTDataset(path, sp_tokenizer, seq_length=64, pack=False)
    first = expected_chatml(sp_tokenizer, [{"role": "user", "content": "Reverse the list.\n\n[1, 2]"},
                                           {"role": "assistant", "content": "[2, 1]"}])
    check_document(ds[0], 0, *first)
    second = expected_chatml(sp_tokenizer, [{"role": "system", "content": "S"},
                                            {"role": "user", "content": "Reverse the list."},
                                            {"role": "assistant", "content": "[2, 1]"}])
    check_document(ds[1], 0, *second)


def test_packing_boundaries_token_by_token(tmp_path, sp_tokenizer):
    records = [CHAT, INSTRUCTION, {"messages": CHAT["messages"][1:3]}, INSTRUCTION]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    conversations = [expected_chatml(sp_tokenizer, CHAT["messages"]),
                     expected_chatml(sp_tokenizer, [{"role": "user", "content": "Reverse the list.\n\n[1, 2]"},
                                                    {"role": "assistant", "content": "[2, 1]"}])]
    conversations = [conversations[0], conversations[1], expected_chatml(sp_tokenizer, CHAT["messages"][1:3]), conversations[1]]
    lengths = [len(ids) for ids, _ in conversations]
    seq_length = lengths[0] + lengths[1] + 3  # the first two fit together, the third does not
    ds = SFTDataset(path, sp_tokenizer, seq_length=seq_length)
    assert ds.packs == [[0, 1], [2, 3]] and len(ds) == 2
    for sample, members in zip((ds[0], ds[1]), ([0, 1], [2, 3])):
        start = 0
        for d in members:
            check_document(sample, start, *conversations[d])
            assert (sample["document_ids"][start:start + lengths[d]] == members.index(d)).all()
            start += lengths[d]
        pad = seq_length - start
        np.testing.assert_array_equal(sample["cu_seqlens"], [0, lengths[members[0]], start] + ([seq_length] if pad else []))
        assert (sample["labels"][start:] == -100).all()
        np.testing.assert_array_equal(sample["position_ids"][start:], np.arange(pad))


def test_attention_never_crosses_documents():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    mask = document_causal_mask(document_ids)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_collate_packed_offsets_cu_seqlens(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [CHAT, INSTRUCTION, INSTRUCTION])
    ds = SFTDataset(path, sp_tokenizer, seq_length=96)
    batch = collate_packed([ds[i] for i in range(len(ds))] * 2)
    assert batch["tokens"].shape == (2 * len(ds), 96)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 2 * len(ds) * 96 and cu == sorted(cu)
    for b in range(2 * len(ds)):
        assert b * 96 in cu  # every row starts a segment
    assert batch["max_seqlen"] == max(np.diff(cu))


def test_truncation_is_counted(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    ds = SFTDataset(path, sp_tokenizer, seq_length=10)
    assert ds.truncated == 1 and ds[0]["tokens"].shape == (10,)


CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_jinja_chat_template_from_tokenizer_config(tmp_path, hf_tokenizer_dir):
    pytest.importorskip("jinja2")
    folder = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template="{{ bos_token }}" + CHATML_JINJA,
                                                                   bos_token="<|endoftext|>")))
    tokenizer = build_tokenizer("hf", str(folder))
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    sample = SFTDataset(path, tokenizer, seq_length=128, pack=False)[0]
    targets = sample["labels"][sample["labels"] != -100]
    # The template closes a turn with '<|im_end|>\n'; both are part of the trained turn.
    assert tokenizer.decode(targets) == "4<|im_end|>\nIt is 6.<|im_end|>\n"
    n = int((sample["tokens"] != tokenizer.pad_id).sum())
    text = tokenizer.decode(sample["tokens"][:n + 1])
    assert text.startswith("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [', "is not valid JSON"),
    ('[1, 2]', "is not a JSON object"),
    ('{"text": "x"}', 'has neither a "messages" nor an "instruction"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "has no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "has a message that is not"),
    ('{"instruction": "x", "output": " "}', "has an empty 'output'"),
])
def test_bad_lines_name_file_and_line(tmp_path, sp_tokenizer, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT, line, CHAT])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: line {problem}"):
        SFTDataset(path, sp_tokenizer, seq_length=64)
    ds = SFTDataset(path, sp_tokenizer, seq_length=64, skip_bad_lines=True)
    assert ds.skipped == 1 and len(ds.documents) == 2


def test_empty_file(tmp_path, sp_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl holds no usable records"):
        SFTDataset(str(path), sp_tokenizer, seq_length=64)

import pytest

from engine.data.errors import DataError
from engine.data.tokenizer import build_tokenizer, check_vocab

TEXT = "def main(argv):\n    return {'a': [1, 2]}  # ünïcode\n\n\tdone"


def test_sentencepiece_round_trip_and_special_ids(sp_tokenizer):
    ids = sp_tokenizer.encode(TEXT)
    assert sp_tokenizer.decode(ids) == TEXT
    assert sp_tokenizer.vocab_size == 400
    assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eod_id) == (0, 2, 3)


def test_sentencepiece_special_tokens_are_single_pieces(sp_tokenizer):
    start, end = sp_tokenizer.token_to_id("<|im_start|>"), sp_tokenizer.token_to_id("<|im_end|>")
    assert sp_tokenizer.encode("<|im_start|>user")[0] == start
    assert sp_tokenizer.encode("hi<|im_end|>")[-1] == end
    assert sp_tokenizer.token_to_id("<|not_a_piece|>") is None


def test_hf_tokenizer_round_trip_and_eos_from_config(hf_tokenizer):
    ids = hf_tokenizer.encode(TEXT)
    assert hf_tokenizer.decode(ids) == TEXT
    assert hf_tokenizer.eod_id == hf_tokenizer.token_to_id("<|endoftext|>") == 0
    assert hf_tokenizer.encode("<|im_end|>") == [hf_tokenizer.token_to_id("<|im_end|>")]
    assert hf_tokenizer.pad_id == hf_tokenizer.eod_id  # no pad token: falls back to EOD
    assert hf_tokenizer.vocab_size == 600


def test_unknown_kind_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="kind 'gpt2' is unknown"):
        build_tokenizer("gpt2", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))


def test_check_vocab(sp_tokenizer):
    check_vocab(sp_tokenizer, 400)
    with pytest.raises(DataError, match=r"vocabulary \(400\) is larger than the model's vocab_size \(256\)"):
        check_vocab(sp_tokenizer, 256)


def test_hf_tokenizer_without_config_finds_eod_by_name(tmp_path, hf_tokenizer_dir):
    import shutil

    shutil.copy(f"{hf_tokenizer_dir}/tokenizer.json", tmp_path / "tokenizer.json")
    tok = build_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    assert tok.eod_id == tok.token_to_id("<|endoftext|>") and tok.chat_template is None

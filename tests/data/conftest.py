"""Shared fixtures: tiny tokenizers trained here from text that ships with Python."""
import glob
import json
import os

import pytest

STDLIB = os.path.dirname(os.__file__)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def stdlib_files(pattern: str = "json/*.py") -> list[str]:
    return sorted(glob.glob(os.path.join(STDLIB, pattern)))


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    from tools.train_tokenizer import main

    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    main(["--input", os.path.join(STDLIB, "json", "*.py"), "--input", os.path.join(STDLIB, "a*.py"),
          "--output-prefix", prefix, "--vocab-size", "400", "--special-tokens", ",".join(SPECIALS), "--threads", "2"])
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path):
    from engine.data.tokenizer import build_tokenizer

    return build_tokenizer("sentencepiece", sp_model_path)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer.json with an eos token named in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"] + SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(stdlib_files(), trainer)
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(folder)


@pytest.fixture(scope="session")
def hf_tokenizer(hf_tokenizer_dir):
    from engine.data.tokenizer import build_tokenizer

    return build_tokenizer("hf", hf_tokenizer_dir)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)

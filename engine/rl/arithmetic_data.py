"""Files for the arithmetic RL demonstration (examples/rl_arithmetic.py) and its tests: a
character-level tokenizer and a pretraining corpus of solved problems "a+b=c".

One character is one token, so the model sees digits as digits; the corpus holds documents
"a+b=c" separated by end-of-document tokens, the layout rl.task arithmetic prompts with
("<eod>a+b=" and the answer, then end-of-document).
"""
from __future__ import annotations

import json
import os

import numpy as np

EOD, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
ALPHABET = "0123456789+-*= "


def write_char_tokenizer(folder: str, alphabet: str = ALPHABET) -> str:
    """A Hugging Face tokenizer.json (+ tokenizer_config.json naming the EOD token) mapping each
    character of `alphabet` to one id; returns the folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOD: 0, PAD: 1, UNK: 2, **{char: 3 + i for i, char in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOD, PAD, UNK])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"eos_token": EOD, "pad_token": PAD}, handle)
    return folder


def solved_problems(count: int, max_operand: int, seed: int) -> list:
    """`count` texts "a+b=c" with operands drawn from 0..max_operand."""
    rng = np.random.default_rng([seed, 17])
    pairs = rng.integers(0, max_operand + 1, size=(count, 2))
    return [f"{a}+{b}={a + b}" for a, b in pairs]


def write_corpus(prefix: str, tokenizer, texts: list) -> str:
    """The texts as one .bin/.idx dataset, each document followed by end-of-document."""
    from engine.data.indexed_dataset import IndexedDatasetWriter

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for text in texts:
            writer.add_document(tokenizer.encode(text) + [tokenizer.eod_id])
        writer.finalize()
    return prefix

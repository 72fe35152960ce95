"""Tokenizers behind one interface, loaded from local files only.

Two backends: sentencepiece `.model` files and Hugging Face `tokenizer.json` files (through
the `tokenizers` library, never `transformers`, so nothing is fetched from a hub). When a
`tokenizer_config.json` sits next to the model file, its special tokens and `chat_template`
are used, as Hugging Face would.

`encode` never adds BOS/EOS by itself: the caller decides (preprocessing appends EOD per
document, chat templates write their own markers).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from engine.data.errors import DataError

# Names that mark "end of document" in common vocabularies, tried in order when a HF
# tokenizer.json comes without a tokenizer_config.json saying which one it is.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """Common interface; subclasses fill in the backend."""

    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> Optional[int]:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer_config(model_path: str) -> dict:
    config_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return {}
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{config_path} is not valid JSON ({e}).") from None


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.path = model_path
        config = _read_tokenizer_config(model_path)
        self.chat_template = config.get("chat_template")
        self.eos_token = _token_content(config.get("eos_token")) or self._piece_or_none(self._sp.eos_id())
        self.bos_token = _token_content(config.get("bos_token")) or self._piece_or_none(self._sp.bos_id())

    def _piece_or_none(self, piece_id: int) -> Optional[str]:
        return self._sp.id_to_piece(piece_id) if piece_id >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        piece_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only a real match counts.
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            return self.token_to_id(self.eos_token)
        raise DataError(f"Sentencepiece model {self.path} has no end-of-document token (train it with an eos piece).")

    @property
    def bos_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from tokenizers import Tokenizer as RustTokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"HF tokenizer file {path} does not exist.")
        self.path = path
        self._tok = RustTokenizer.from_file(path)
        config = _read_tokenizer_config(path)
        self.chat_template = config.get("chat_template")
        self.eos_token = _token_content(config.get("eos_token")) or self._first_known(_EOS_CANDIDATES)
        self.bos_token = _token_content(config.get("bos_token")) or self._first_known(_BOS_CANDIDATES)
        self._pad_token = _token_content(config.get("pad_token")) or self._first_known(_PAD_CANDIDATES)

    def _first_known(self, candidates) -> Optional[str]:
        return next((t for t in candidates if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        if self.eos_token is None:
            raise DataError(f"HF tokenizer {self.path} has no end-of-document token; name one as eos_token in tokenizer_config.json.")
        return self._tok.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> Optional[int]:
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(self._pad_token) if self._pad_token else self.eod_id


TOKENIZER_KINDS = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}


def build_tokenizer(kind: str, path: str) -> Tokenizer:
    """Load a tokenizer of `kind` ("sentencepiece" or "hf") from a local path."""
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"Tokenizer kind {kind!r} is unknown; use one of {sorted(TOKENIZER_KINDS)}.")
    if not os.path.exists(path):
        raise DataError(f"Tokenizer file {path} does not exist.")
    return TOKENIZER_KINDS[kind](path)


def check_vocab(tokenizer: Tokenizer, model_vocab: int) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding table does not have."""
    if tokenizer.vocab_size > model_vocab:
        raise DataError(
            f"Tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's vocab_size ({model_vocab})."
        )

"""Chat records -> token ids with a mask of the tokens the model is trained to produce.

Two record formats are accepted:
  {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}

Rendering uses, in order: an explicit template string, the tokenizer's `chat_template` (from a
local tokenizer_config.json) rendered with jinja2, or the built-in ChatML template:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Only assistant turns are trained: their content and closing marker; the role header, the other
turns and the separators are masked. For a jinja template the turns are found by rendering
growing prefixes of the conversation, so the template must render a prefix of a conversation
as a prefix of the whole (all common templates do). Each piece is tokenized on its own and
the ids concatenated, so a turn boundary never merges into one token.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from engine.data.errors import DataError
from engine.data.jsonl import BadRecord

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def messages_from_record(record: dict) -> list[dict]:
    """The conversation in a record of either format, validated."""
    if "messages" in record:
        return validate_messages(record["messages"])
    if "instruction" in record:
        return _instruction_messages(record)
    raise BadRecord('has neither a "messages" nor an "instruction" field')


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord('has a "messages" field that is not a non-empty list')
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRecord(f'has a message that is not {{"role": one of {list(ROLES)}, "content": string}}')
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("has no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _instruction_messages(record: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"has no string {key!r} field")
    if not record["output"].strip():
        raise BadRecord("has an empty 'output'")
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def _jinja_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BadRecord(f"is rejected by the chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class ChatRenderer:
    def __init__(self, tokenizer, template: Optional[str] = None):
        self.tokenizer = tokenizer
        source = template if template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(source, list):  # tokenizer_config.json may hold several named templates
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self._jinja = None
        if source:
            try:
                self._jinja = _jinja_template(source)
            except ImportError:
                warnings.warn("jinja2 is not installed; using the built-in ChatML template instead of the tokenizer's.")

    def segments(self, messages: list[dict], train_from: int = 0) -> list[tuple[str, bool]]:
        """(text, trained) pieces; assistant turns at index >= train_from are trained."""
        if self._jinja is None:
            return self._builtin_segments(messages, train_from)
        return self._template_segments(messages, train_from)

    def tokenize(self, messages: list[dict], train_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) arrays; trained[t] says token t is a target of the loss."""
        ids, trained = [], []
        for text, is_trained in self.segments(messages, train_from):
            piece = self.tokenizer.encode(text)
            ids += piece
            trained += [is_trained] * len(piece)
        return np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)

    @staticmethod
    def _builtin_segments(messages, train_from):
        out = []
        for i, m in enumerate(messages):
            trained = m["role"] == "assistant" and i >= train_from
            out += [(f"{IM_START}{m['role']}\n", False), (m["content"] + IM_END, trained), ("\n", False)]
        return out

    def _render(self, messages, add_generation_prompt):
        tok = self.tokenizer
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def _template_segments(self, messages, train_from):
        out, done = [], ""
        try:
            done = self._render([], False)
        except Exception:  # some templates index messages[0]; an empty conversation renders as nothing
            done = ""
        out.append((done, False))
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                header = self._render(messages[:i], True)
                out.append((self._suffix(done, header), False))
                done = header
            full = self._render(messages[: i + 1], False)
            out.append((self._suffix(done, full), m["role"] == "assistant" and i >= train_from))
            done = full
        return [(text, trained) for text, trained in out if text]

    @staticmethod
    def _suffix(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise DataError("The chat template does not render a conversation's prefix as a prefix of it; "
                            "assistant turns cannot be located for loss masking.")
        return text[len(prefix):]


def shifted_labels(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 is trained, else -100; the last position has no target."""
    labels = np.full(len(ids), -100, dtype=np.int64)
    if len(ids) > 1:
        labels[:-1] = np.where(trained[1:], ids[1:], -100)
    return labels

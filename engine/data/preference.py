"""Preference pairs for DPO: JSONL with prompt / chosen / rejected.

Accepted records:
  {"prompt": str | [messages], "chosen": str | message | [messages], "rejected": same}
  {"chosen": [messages], "rejected": [messages]}   (no prompt: the messages both share
                                                     before they differ are the prompt)

With format="chat" (default) a text prompt is one user message and a text response one
assistant message, rendered with the chat template (chat.py). With format="text" prompt and
response are plain strings joined as prompt + response + EOD.

Both sequences start with the same prompt tokens; only response tokens are trained. Each
sample holds, for "chosen" and "rejected", `<name>_tokens`, `<name>_labels` (-100 on prompt
and padding, shifted like SFT labels) and `<name>_loss_mask`, all of seq_length, plus
`prompt_length`. A prompt that leaves no room for a response is an error; a response that
does not fit is cut and counted in `truncated`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from engine.data.chat import ChatRenderer, shifted_labels, validate_messages
from engine.data.errors import DataError
from engine.data.jsonl import BadRecord, JsonlReader

RESPONSES = ("chosen", "rejected")


def _as_messages(value, role: str, field: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRecord(f"has a {field!r} field that is neither text nor messages")
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        raise BadRecord(f"has a {field!r} message without string content")
    return value


def split_prompt(record: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """(prompt messages, {"chosen": response messages, "rejected": ...})."""
    for field in RESPONSES:
        if field not in record:
            raise BadRecord(f"has no {field!r} field")
    responses = {f: _as_messages(record[f], "assistant", f) for f in RESPONSES}
    if "prompt" in record:
        prompt = _as_messages(record["prompt"], "user", "prompt")
    else:
        chosen, rejected = responses["chosen"], responses["rejected"]
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        responses = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    for field, messages in responses.items():
        if any(m.get("role", "assistant") != "assistant" for m in messages):
            raise BadRecord(f"has a {field!r} response that is not from the assistant")
        if not "".join(m["content"] for m in messages).strip():
            raise BadRecord(f"has an empty {field!r} response")
    return prompt, responses


class PreferenceDataset:
    def __init__(self, path: str, tokenizer, seq_length: int, format: str = "chat",
                 chat_template: Optional[str] = None, skip_bad_lines: bool = False):
        if format not in ("chat", "text"):
            raise DataError(f"Preference format {format!r} is unknown; use 'chat' or 'text'.")
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_id
        self.tokenizer = tokenizer
        self.format = format
        self.renderer = ChatRenderer(tokenizer, chat_template)
        self.truncated = 0
        reader = JsonlReader(path, self._tokenize_pair, skip_bad_lines)
        self.pairs = [pair for _, pair in reader]
        self.skipped = reader.skipped

    def _tokenize_pair(self, record: dict) -> dict:
        prompt, responses = split_prompt(record)
        tokenized = {f: self._tokenize(prompt, responses[f]) for f in RESPONSES}
        prompt_length = int(np.argmax(tokenized["chosen"][1]))  # first trained token
        if prompt_length >= self.seq_length:
            raise BadRecord(f"has a prompt of {prompt_length} tokens, leaving no room for a response "
                            f"within seq_length {self.seq_length}")
        pair = {"prompt_length": prompt_length}
        for field, (ids, trained) in tokenized.items():
            if not np.array_equal(ids[:prompt_length], tokenized["chosen"][0][:prompt_length]) or trained[:prompt_length].any():
                raise BadRecord("has chosen and rejected sequences that do not start with the same prompt tokens")
            if len(ids) > self.seq_length:
                ids, trained = ids[: self.seq_length], trained[: self.seq_length]
                self.truncated += 1
            pair[field] = (ids, shifted_labels(ids, trained))
        return pair

    def _tokenize(self, prompt, response) -> tuple[np.ndarray, np.ndarray]:
        if self.format == "chat":
            return self.renderer.tokenize(validate_messages(prompt + response), train_from=len(prompt))
        prompt_ids = self.tokenizer.encode("".join(m["content"] for m in prompt))
        response_ids = self.tokenizer.encode("".join(m["content"] for m in response)) + [self.tokenizer.eod_id]
        trained = [False] * len(prompt_ids) + [True] * len(response_ids)
        return np.asarray(prompt_ids + response_ids, dtype=np.int64), np.asarray(trained, dtype=bool)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        sample = {"prompt_length": pair["prompt_length"]}
        for field in RESPONSES:
            ids, labels = pair[field]
            padding = self.seq_length - len(ids)
            sample[f"{field}_tokens"] = np.concatenate([ids, np.full(padding, self.pad_id, np.int64)])
            sample[f"{field}_labels"] = np.concatenate([labels, np.full(padding, -100, np.int64)])
            sample[f"{field}_loss_mask"] = (sample[f"{field}_labels"] != -100).astype(np.float32)
        return sample

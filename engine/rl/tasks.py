"""Prompt sources for PPO / GRPO and their rule-based rewards.

- `arithmetic`: "a+b=" problems with operands 0..rl.arithmetic_max, drawn from
  (train.seed, prompt index), so every layout and a resumed run see the same prompts.
- `prompts`: JSONL records {"prompt": str, "answer": str}, taken in file order, cycling.

Each prompt is encoded after one end-of-document token, as a document follows the previous
one in pretraining data. The rule reward compares the response text (up to its end-of-document
token) with the answer: 1.0 when equal, otherwise partial credit 0.5 x (length of the common
prefix) / (length of the longer of the two), so a response that gets the leading digits right
scores above one that does not, and only the exact answer scores 1.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from engine.config import ConfigError


@dataclasses.dataclass
class PromptItem:
    text: str
    ids: list
    answer: str


def rule_reward(response: str, answer: str) -> float:
    response = response.strip()
    if response == answer:
        return 1.0
    common = 0
    while common < min(len(response), len(answer)) and response[common] == answer[common]:
        common += 1
    return 0.5 * common / max(len(response), len(answer), 1)


class PromptTask:
    """Prompt i of the run, encoded; subclasses say what prompt i is."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens

    def __len__(self) -> int:
        return 1 << 40  # prompts are indexed by (iteration, rank, position); never exhausted

    def problem(self, index: int) -> tuple:
        raise NotImplementedError

    def item(self, index: int) -> PromptItem:
        text, answer = self.problem(index)
        ids = [self.tokenizer.eod_id] + self.tokenizer.encode(text)
        if len(ids) > self.max_prompt_tokens:
            raise ConfigError(f"rl.max_new_tokens: prompt {index} has {len(ids)} tokens but model.seq_length minus "
                              f"rl.max_new_tokens leaves {self.max_prompt_tokens}")
        return PromptItem(text, ids, answer)

    def items(self, start: int, count: int) -> list:
        return [self.item(index) for index in range(start, start + count)]

    def score(self, item: PromptItem, response_ids: list) -> float:
        ids = [t for t in response_ids if t != self.tokenizer.eod_id]
        return rule_reward(self.tokenizer.decode(ids), item.answer)


class ArithmeticTask(PromptTask):
    def __init__(self, tokenizer, max_prompt_tokens: int, max_operand: int, seed: int):
        super().__init__(tokenizer, max_prompt_tokens)
        self.high, self.seed = max_operand + 1, seed

    def problem(self, index: int) -> tuple:
        a, b = np.random.default_rng([self.seed, 4049, index]).integers(0, self.high, size=2)
        return f"{a}+{b}=", str(a + b)


class PromptFileTask(PromptTask):
    def __init__(self, tokenizer, max_prompt_tokens: int, path: str):
        super().__init__(tokenizer, max_prompt_tokens)
        self.records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"rl.prompts: {path}:{number} is not valid JSON") from None
                if not isinstance(record.get("prompt"), str):
                    raise ConfigError(f"rl.prompts: {path}:{number} has no string 'prompt' field")
                self.records.append((record["prompt"], str(record.get("answer", ""))))
        if not self.records:
            raise ConfigError(f"rl.prompts: {path} holds no prompts")

    def problem(self, index: int) -> tuple:
        return self.records[index % len(self.records)]


def build_task(cfg, tokenizer) -> PromptTask:
    r = cfg.rl
    max_prompt = cfg.model.seq_length - r.max_new_tokens
    if r.task == "arithmetic":
        return ArithmeticTask(tokenizer, max_prompt, r.arithmetic_max, cfg.train.seed)
    task = PromptFileTask(tokenizer, max_prompt, r.prompts)
    if r.reward == "rule" and not all(answer for _, answer in task.records):
        raise ConfigError("rl.reward: rule rewards compare with each record's 'answer', which "
                          f"{r.prompts} does not always give; add answers or use rl.reward model")
    return task

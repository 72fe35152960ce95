"""The `rl` section of the configuration: PPO and GRPO (docs/rl.md)."""
from __future__ import annotations

import dataclasses
import os

TASKS = ("arithmetic", "prompts")
DECODE_MODES = ("auto", "eager")
REWARDS = ("rule", "model")


@dataclasses.dataclass
class RLConfig:
    # prompts: arithmetic (generated "a+b=" problems) | prompts (JSONL records {"prompt", "answer"?} in rl.prompts)
    task: str = "arithmetic"
    prompts: str = ""
    arithmetic_max: int = 99  # operands are drawn from 0..arithmetic_max
    reward: str = "rule"  # rule (the task's checker) | model (the trained reward model in rl.reward_model)
    reward_model: str = ""  # checkpoint of a train.objective reward run
    reference: str = ""  # checkpoint of the frozen reference policy ("" = the policy's starting weights)
    prompts_per_iter: int = 16  # prompts of one rollout, over all data-parallel ranks
    group_size: int = 1  # samples per prompt (GRPO's G; at least 2 for grpo)
    max_new_tokens: int = 16  # the response budget; prompts get model.seq_length minus this
    temperature: float = 1.0  # rollout sampling (0: greedy)
    top_k: int = 0
    top_p: float = 1.0
    decode: str = "auto"  # rollout decode steps: auto (CUDA graphs where they apply) | eager (engine/generation.py)
    # Rows per no-grad forward that scores the rollout (policy log-probs and values, reference
    # log-probs); 0: 4 x train.micro_batch_size. Such a forward keeps no activations.
    score_micro_batch: int = 0
    epochs: int = 1  # optimisation passes over each rollout, in minibatches of train.global_batch_size
    clip_ratio: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # PPO: values move at most this far from the rollout's (0: unclipped)
    vf_coef: float = 0.5  # PPO: weight of the value loss (shared trunk)
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE lambda
    kl_coef: float = 0.05  # PPO: KL penalty in the reward; GRPO: beta of the KL term in the loss
    kl_target: float = 0.0  # PPO: > 0 adapts kl_coef towards this KL per sequence (Ziegler et al. 2019)
    kl_horizon: int = 10000  # PPO: adaptive controller's horizon in sequences
    whiten_advantages: bool = True  # PPO: advantages to zero mean, unit variance over the rollout


def validate_rl(cfg, dp: int) -> None:
    """Checks of the rl section for train.objective ppo / grpo."""
    from engine.config import ConfigError, _require

    r, t, m = cfg.rl, cfg.train, cfg.model
    _require(r.task in TASKS, "rl.task", f"must be one of {', '.join(TASKS)}; got {r.task!r}")
    _require(r.reward in REWARDS, "rl.reward", f"must be one of {', '.join(REWARDS)}; got {r.reward!r}")
    _require(bool(cfg.data.tokenizer), "data.tokenizer", f"train.objective {t.objective} needs the tokenizer")
    if r.task == "prompts":
        _require(os.path.isfile(r.prompts), "rl.prompts", f"rl.task prompts needs a JSONL file of prompts; {r.prompts!r} does not exist")
    if r.reward == "model":
        _require(os.path.isdir(r.reward_model), "rl.reward_model", f"rl.reward model needs a reward-model checkpoint; {r.reward_model!r} does not exist")
    _require(not r.reference or os.path.isdir(r.reference), "rl.reference", f"directory {r.reference!r} does not exist")
    _require(r.arithmetic_max >= 1, "rl.arithmetic_max", f"must be at least 1, got {r.arithmetic_max}")
    _require(r.group_size >= (2 if t.objective == "grpo" else 1), "rl.group_size",
             f"GRPO compares samples of one prompt, so it needs at least 2; got {r.group_size}" if t.objective == "grpo"
             else f"must be at least 1, got {r.group_size}")
    _require(r.prompts_per_iter >= 1 and r.prompts_per_iter % dp == 0, "rl.prompts_per_iter",
             f"{r.prompts_per_iter} must be a positive multiple of the data-parallel size {dp}")
    rollout = r.prompts_per_iter * r.group_size
    _require(rollout % t.global_batch_size == 0, "train.global_batch_size",
             f"{t.global_batch_size} must divide the rollout of rl.prompts_per_iter x rl.group_size = {rollout} sequences")
    _require(1 <= r.max_new_tokens < m.seq_length, "rl.max_new_tokens",
             f"must be at least 1 and leave room for the prompt in model.seq_length={m.seq_length}; got {r.max_new_tokens}")
    _require(r.temperature >= 0, "rl.temperature", f"must be non-negative (0 = greedy), got {r.temperature}")
    _require(r.top_k >= 0 and 0 < r.top_p <= 1, "rl.top_p", f"need rl.top_k >= 0 and 0 < rl.top_p <= 1; got {r.top_k}, {r.top_p}")
    _require(r.decode in DECODE_MODES, "rl.decode", f"must be one of {', '.join(DECODE_MODES)}; got {r.decode!r}")
    _require(r.score_micro_batch >= 0, "rl.score_micro_batch", f"must be non-negative (0 = 4 x train.micro_batch_size), got {r.score_micro_batch}")
    _require(r.epochs >= 1, "rl.epochs", f"must be at least 1, got {r.epochs}")
    _require(0 < r.clip_ratio < 1, "rl.clip_ratio", f"must be in (0, 1), got {r.clip_ratio}")
    _require(r.value_clip >= 0 and r.vf_coef >= 0, "rl.value_clip", "rl.value_clip and rl.vf_coef must be non-negative")
    _require(0 <= r.gamma <= 1 and 0 <= r.lam <= 1, "rl.gamma", f"rl.gamma and rl.lam must be in [0, 1]; got {r.gamma}, {r.lam}")
    _require(r.kl_coef >= 0 and r.kl_target >= 0, "rl.kl_coef", "rl.kl_coef and rl.kl_target must be non-negative")
    _require(r.kl_horizon >= 1, "rl.kl_horizon", f"must be at least 1, got {r.kl_horizon}")
    _require(m.dropout == 0 and m.attention_dropout == 0, "model.dropout",
             "PPO/GRPO train with dropout off (the policy ratio must be 1 before the first update); set it to 0")
    _require(not t.eval_interval, "train.eval_interval", "PPO/GRPO have no validation set (each iteration logs its rewards); use 0")
    if t.objective == "grpo" and r.kl_target:
        raise ConfigError("rl.kl_target: the adaptive KL controller is PPO's; GRPO keeps rl.kl_coef fixed")

"""PPO and GRPO end to end on a tiny model with seeded sampling: TP=2 with sequence
parallelism and PP=2 give one process's rewards, KL and losses iteration by iteration; PPO also
runs on a reward model trained here (saved at one process, loaded at TP=2); clear errors for a
reward model of another vocabulary and for GRPO without groups."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from engine.config import ConfigError, validate
from tests.distributed import run_distributed
from tests.training_harness import tiny_config

COMPARED = ("reward_mean", "kl", "loss", "policy_loss", "value_loss", "kl_loss", "grad_norm", "response_length")


def rl_overrides(objective: str, tokenizer: str, **rl) -> dict:
    return {"model": {"preset": "tiny", "seq_length": 16},
            "train": {"objective": objective, "iters": 3, "global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-3},
            "data": {"mock": False, "tokenizer": tokenizer, "tokenizer_type": "hf"},
            "rl": {"prompts_per_iter": 8, "group_size": 2, "max_new_tokens": 5, "epochs": 2, "temperature": 1.0, **rl}}


def run_all(runs: list) -> list:
    """Train each (overrides) in turn in this rank's process; each run's per-iteration records."""
    from engine.training import shutdown, trainer_class

    torch.use_deterministic_algorithms(True)
    histories = []
    for overrides in runs:
        cfg = validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"]))
        histories.append(trainer_class(cfg.train.objective)(cfg).train())
    shutdown()
    return histories


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from engine.data.tokenizer import build_tokenizer
    from engine.rl.arithmetic_data import write_char_tokenizer
    from tests.data.conftest import write_jsonl

    folder = tmp_path_factory.mktemp("rl")
    tokenizer = write_char_tokenizer(str(folder / "tok"))
    assert build_tokenizer("hf", tokenizer).encode("12+7=") == [4, 5, 13, 10, 16]  # one id per character
    rng = np.random.default_rng(0)
    pairs = []
    for a, b in rng.integers(0, 50, size=(64, 2)):
        pairs.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + int(rng.integers(1, 9)))})
    preference = write_jsonl(folder / "pairs.jsonl", pairs)
    return {"tokenizer": tokenizer, "pairs": preference, "reward_ckpt": str(folder / "reward_ckpt")}


def layout_runs(files: dict) -> list:
    """PPO with the rule reward, GRPO and PPO (adaptive KL) with the reward model. A random
    policy rarely earns a rule reward, and GRPO's gradient is then only its KL term, which at
    policy = reference is fp32 noise; reward-model scores give every group a real signal."""
    model_reward = dict(reward="model", reward_model=files["reward_ckpt"])
    return [rl_overrides("ppo", files["tokenizer"], group_size=1), rl_overrides("grpo", files["tokenizer"], **model_reward),
            rl_overrides("ppo", files["tokenizer"], group_size=1, kl_target=0.5, kl_horizon=40, **model_reward)]


@functools.lru_cache(maxsize=None)
def serial_histories(key: str) -> list:
    files = json.loads(key)
    reward_training = {"model": {"preset": "tiny", "seq_length": 16},
                       "train": {"objective": "reward", "iters": 4, "global_batch_size": 8, "lr": 3e-3},
                       "data": {"mock": False, "tokenizer": files["tokenizer"], "tokenizer_type": "hf",
                                "preference_train": files["pairs"], "preference_format": "text"},
                       "checkpoint": {"save": files["reward_ckpt"]}}
    return run_distributed(run_all, 1, [reward_training] + layout_runs(files))[0][1:]


def assert_same_iterations(result: list, serial: list) -> None:
    assert len(result) == len(serial)
    for got, expected in zip(result, serial):
        for key in COMPARED:
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=2e-4, abs=2e-5), (key, got, expected)


def test_ppo_and_grpo_one_process(files):
    ppo, grpo, ppo_model = serial_histories(json.dumps(files))
    for history in (ppo, grpo, ppo_model):
        assert len(history) == 3
        assert history[0]["kl"] == pytest.approx(0, abs=1e-5), "the first rollout's policy is the reference"
    for history in (ppo, grpo):  # (the sampled KL estimate can be negative; these move clearly)
        assert history[-1]["kl"] > 1e-2, "the policy should have moved away from the reference"
    assert all(0 <= r["reward_mean"] <= 1 for r in ppo)
    assert "value_loss" in ppo[0] and "kl_loss" in grpo[0] and "value_loss" not in grpo[0]
    # Reward-model scores are real numbers, not the rule's 0 / 0.25 / 0.5 / 1 steps.
    assert ppo_model[0]["reward_mean"] not in (0.0, 0.25, 0.5, 1.0) and ppo_model[0]["reward_mean"] != ppo[0]["reward_mean"]
    assert ppo_model[1]["kl_coef"] != 0.05, "the adaptive controller should move the KL coefficient"


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2"])
def test_parallel_rl_matches_one_process(files, layout):
    serial = serial_histories(json.dumps(files))
    parallel = {"tp2_sp": {"tp": 2, "sp": True}, "pp2": {"pp": 2}}[layout]
    runs = [{**overrides, "parallel": parallel} for overrides in layout_runs(files)]
    for rank_histories in run_distributed(run_all, 2, runs):
        for result, expected in zip(rank_histories, serial):
            assert_same_iterations(result, expected)


def test_scoring_rows_per_forward_do_not_change_a_run(files):
    """The rollout's log-probabilities and values read 2 rows at a time (rl.score_micro_batch)
    give the iterations of the default (4 x micro-batch 4: the whole rollout in one forward)."""
    serial = serial_histories(json.dumps(files))[0]
    run = rl_overrides("ppo", files["tokenizer"], group_size=1, score_micro_batch=2)
    assert_same_iterations(run_distributed(run_all, 1, [run])[0][0], serial)


def test_reward_model_of_another_vocabulary_is_refused(files, tmp_path):
    from engine.rl.scoring import RewardModelScorer
    from models.config import ModelConfig, resolve_preset

    step = tmp_path / "step_000001"
    step.mkdir()
    other = dict(vars(resolve_preset(ModelConfig(preset="tiny", vocab_size=1024))))
    (step / "trellis.json").write_text(json.dumps({"format": "trellis-checkpoint", "step": 1, "model": other}))
    cfg = validate(tiny_config(rl_overrides("ppo", files["tokenizer"], reward="model", reward_model=str(step))), 1)
    with pytest.raises(ConfigError, match="reward model's vocabulary has 1024 tokens but the policy's has 512"):
        RewardModelScorer(cfg, None, None, "cpu", torch.float32, None)


def test_rl_config_errors(files):
    with pytest.raises(ConfigError, match="rl.group_size: GRPO compares samples"):
        validate(tiny_config(rl_overrides("grpo", files["tokenizer"], group_size=1)), 1)
    with pytest.raises(ConfigError, match="train.global_batch_size: 8 must divide"):
        validate(tiny_config(rl_overrides("ppo", files["tokenizer"], prompts_per_iter=3, group_size=1)), 1)
    with pytest.raises(ConfigError, match="rl.max_new_tokens"):
        validate(tiny_config(rl_overrides("ppo", files["tokenizer"], max_new_tokens=16)), 1)
    with pytest.raises(ConfigError, match="rl.decode: must be one of auto, eager"):
        validate(tiny_config(rl_overrides("ppo", files["tokenizer"], decode="graph")), 1)
    with pytest.raises(ConfigError, match="rl.score_micro_batch: must be non-negative"):
        validate(tiny_config(rl_overrides("ppo", files["tokenizer"], score_micro_batch=-1)), 1)


def bench_on_cpu() -> dict:
    from tools import bench_rl

    return bench_rl.run(bench_rl.parse_args(["--preset", "tiny", "--device", "cpu", "--prompts", "4", "--prompt-len", "12",
                                             "--new-tokens", "4", "--micro-batch", "2", "--iters", "1"]))


def test_rl_benchmark_runs_on_cpu():
    summary = run_distributed(bench_on_cpu, 1)[0]
    assert summary["precision"] == "fp32" and summary["generation_tokens_per_s"] > 0 and summary["train_tokens_per_s"] > 0

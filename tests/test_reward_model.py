"""Reward-model objective: the Bradley-Terry loss learns a preference (accuracy rises), and
TP=2 with sequence parallelism and PP=2 train the same model (scalar head included) as one
process; the head reads the last real token of each sequence."""
import glob
import os
import random

import pytest
import torch

from tests.data.conftest import STDLIB, sp_model_path, write_jsonl  # noqa: F401 (fixture)
from tests.distributed import run_distributed
from tests.training_harness import train_and_collect


def preference_records(count: int) -> list:
    """Chosen: a line of real Python; rejected: the same characters shuffled."""
    lines = [line.strip() for path in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")))
             for line in open(path) if 20 < len(line.strip()) < 50]
    rng = random.Random(0)
    records = []
    for line in lines[:count]:
        shuffled = list(line)
        rng.shuffle(shuffled)
        records.append({"prompt": "Code: ", "chosen": line, "rejected": "".join(shuffled)})
    return records


@pytest.fixture(scope="module")
def reward_overrides(sp_model_path, tmp_path_factory):  # noqa: F811
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_records(96))
    return {"train": {"objective": "reward", "iters": 12, "lr": 2e-3, "lr_schedule": "constant", "global_batch_size": 8},
            "data": {"mock": False, "preference_train": path, "preference_format": "text", "tokenizer": sp_model_path}}


def test_reward_model_learns_and_parallel_matches_serial(reward_overrides):
    one = run_distributed(train_and_collect, 1, reward_overrides, False)[0]
    accuracy = [r["accuracy"] for r in one["records"]]
    assert one["loss"][-1] < one["loss"][0] - 0.2, one["loss"]
    assert sum(accuracy[-4:]) / 4 > 0.8 > accuracy[0], accuracy
    # Pairs of 8 make this objective amplify fp32 summation-order noise (1e-5 after 10 steps),
    # so the parallel runs are compared on the first 6 steps (constant LR: same as the serial's).
    for parallel in ({"tp": 2, "sp": True}, {"pp": 2}):
        overrides = {**reward_overrides, "parallel": parallel, "train": {**reward_overrides["train"], "iters": 6}}
        for result in run_distributed(train_and_collect, 2, overrides, False):
            torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(one["loss"][:6]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.tensor(result["grad_norm"]), torch.tensor(one["grad_norm"][:6]), rtol=1e-4, atol=1e-6)
            assert [r["accuracy"] for r in result["records"]] == accuracy[:6]


def pair_batch_scores(model_path: str):
    """The reward of a pair equals the head's value at the last response token alone."""
    from engine.data.preference import PreferenceDataset
    from engine.data.tokenizer import build_tokenizer
    from engine.inference import build_chunks
    from engine.rl.data import collate_pairs
    from models.config import ModelConfig, resolve_preset
    from models.value_head import attach_scalar_head, last_token_scores
    from parallel.grid import build_grid, init_distributed
    from parallel.random import RNGTracker

    device = init_distributed("cpu")
    grid = build_grid()
    model = build_chunks(resolve_preset(ModelConfig(preset="tiny")), grid, RNGTracker(device), device, torch.float32, 1)[0]
    attach_scalar_head(model, 1)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pairs_{os.getpid()}.jsonl")
    write_jsonl(path, preference_records(3))
    dataset = PreferenceDataset(path, build_tokenizer("sentencepiece", model_path), 64, format="text")
    batch = collate_pairs([dataset[i] for i in range(3)], device)
    with torch.no_grad():
        scores = last_token_scores(model.scalar_head(model(batch["tokens"], return_hidden=True)), batch["last_index"])
        alone = []
        for row, last in zip(batch["tokens"], batch["last_index"]):
            values = model.scalar_head(model(row[: last + 1].unsqueeze(0), return_hidden=True))
            alone.append(values[0, -1])
    tokenizer_eod = build_tokenizer("sentencepiece", model_path).eod_id
    return scores, torch.stack(alone), [row[last].item() for row, last in zip(batch["tokens"], batch["last_index"])], tokenizer_eod


def test_reward_is_read_at_the_last_token(sp_model_path):  # noqa: F811
    scores, alone, last_tokens, eod = run_distributed(pair_batch_scores, 1, sp_model_path)[0]
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-6)
    assert last_tokens == [eod] * 6, "text-format responses end with the end-of-document token"

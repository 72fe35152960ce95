"""SFT objective: packed conversations equal conversations run alone, only assistant tokens
are trained, SFT at TP=2 / PP=2 equals one process; and the training controls (freeze,
loss-spike guard, early stopping)."""
import ast
import functools
import glob
import os

import numpy as np
import pytest
import torch

from tests.data.conftest import SPECIALS, STDLIB, sp_model_path, write_jsonl  # noqa: F401 (fixture)
from tests.distributed import run_distributed
from tests.training_harness import tiny_config, train_and_collect

SEQ = 256  # several conversations (~80 tokens each) per packed sample
PACK_SEQ = SEQ


def docstring_records(limit: int) -> list:
    """Instruction records from real stdlib functions: docstring -> first lines of the body."""
    records = []
    for path in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py"))) + [os.path.join(STDLIB, name) for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "string.py", "bisect.py", "copy.py")]:
        source = open(path).read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                body = "\n".join(ast.get_source_segment(source, stmt) for stmt in node.body[1:3]) or "pass"
                records.append({"instruction": f"def {node.name}: " + ast.get_docstring(node)[:30], "output": body[:40]})
    return records[:limit]


@pytest.fixture(scope="module")
def sft_files(sp_model_path, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("sft")
    records = docstring_records(48)
    assert len(records) == 48
    train = write_jsonl(folder / "train.jsonl", records[:40])
    valid = write_jsonl(folder / "valid.jsonl", records[40:])
    return {"model": sp_model_path, "train": train, "valid": valid}


# ---- one process: packing and masking --------------------------------------------------------
def _tiny_model(preset: str = "tiny"):
    from models.config import ModelConfig, resolve_preset
    from models.gpt import GPTModel
    from parallel.random import RNGTracker

    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cfg = resolve_preset(ModelConfig(preset=preset, seq_length=PACK_SEQ))
    model = GPTModel(cfg, torch.distributed.group.WORLD, RNGTracker("cpu"))
    model.init_weights(3)
    return model.eval()


def _packed_sample(model_path, train_path):
    from engine.data.sft import SFTDataset
    from engine.data.tokenizer import build_tokenizer

    dataset = SFTDataset(train_path, build_tokenizer("sentencepiece", model_path), PACK_SEQ, pack=True)
    index = next(i for i in range(len(dataset)) if len(dataset.packs[i]) >= 3)
    return dataset[index]


def packed_vs_alone(model_path, train_path, preset) -> dict:
    """Logits and token losses of a packed sample, and of each of its documents run alone."""
    from engine.batches import collate

    model = _tiny_model(preset)
    batch = collate([_packed_sample(model_path, train_path)], "cpu")
    with torch.no_grad():
        packed_logits = model(batch["tokens"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        packed_loss = model(batch["tokens"], labels=batch["labels"], position_ids=batch["position_ids"],
                            document_ids=batch["document_ids"])
        alone = []
        cu = batch["document_ids"][0]
        for doc in cu.unique()[:-1]:  # the last segment is padding
            where = (cu == doc).nonzero().squeeze(-1)
            tokens, labels = batch["tokens"][:, where], batch["labels"][:, where]
            alone.append((where, model(tokens), model(tokens, labels=labels)))
    torch.distributed.destroy_process_group()
    return {"packed_logits": packed_logits, "packed_loss": packed_loss, "alone": alone,
            "loss_mask": batch["loss_mask"]}


# RoPE (tiny) is shift-invariant, so it checks the document mask; learned positions
# (tiny-gpt2) also check that positions restart at 0 in every document.
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_packed_documents_equal_documents_run_alone(sft_files, preset):
    result = run_distributed(packed_vs_alone, 1, sft_files["model"], sft_files["train"], preset)[0]
    assert len(result["alone"]) >= 3
    for where, logits, loss in result["alone"]:
        torch.testing.assert_close(result["packed_logits"][where], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["packed_loss"][:, where], loss, rtol=1e-5, atol=1e-5)


def masked_loss_under_changed_targets(model_path, train_path) -> tuple:
    """The masked loss with the real labels, and with every untrained position's target replaced."""
    from engine.batches import collate

    model = _tiny_model()
    batch = collate([_packed_sample(model_path, train_path)], "cpu")
    untrained = batch["loss_mask"] == 0
    scrambled = batch["labels"].clone()
    scrambled[untrained] = torch.randint(0, 300, (int(untrained.sum()),))
    with torch.no_grad():
        kwargs = dict(position_ids=batch["position_ids"], document_ids=batch["document_ids"], loss_weights=batch["loss_mask"])
        real = model(batch["tokens"], labels=batch["labels"], **kwargs)
        changed = model(batch["tokens"], labels=scrambled, **kwargs)
        unmasked = model(batch["tokens"], labels=scrambled, **{**kwargs, "loss_weights": torch.ones_like(batch["loss_mask"])})
        real_unmasked = model(batch["tokens"], labels=batch["labels"], **{**kwargs, "loss_weights": torch.ones_like(batch["loss_mask"])})
    torch.distributed.destroy_process_group()
    return real, changed, unmasked, real_unmasked


def test_only_assistant_tokens_are_trained(sft_files):
    from engine.data.chat import ChatRenderer
    from engine.data.sft import SFTDataset
    from engine.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("sentencepiece", sft_files["model"])
    dataset = SFTDataset(sft_files["train"], tokenizer, 4096, pack=False)
    sample = dataset[0]
    record = docstring_records(1)[0]
    messages = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    ids, trained = ChatRenderer(tokenizer).tokenize(messages)
    # The targets are exactly the assistant's tokens (its content and closing marker).
    assert sample["loss_mask"].sum() == trained.sum() > 0
    assert np.array_equal(sample["labels"][sample["loss_mask"] > 0], ids[trained])
    real, changed, unmasked, real_unmasked = run_distributed(masked_loss_under_changed_targets, 1, sft_files["model"],
                                                             sft_files["train"])[0]
    assert real == changed  # the user turn's (and padding's) targets do not reach the loss
    assert unmasked != real_unmasked  # ...while without the mask they would


# ---- training: parity and controls ------------------------------------------------------------
def sft_overrides(files, **extra) -> dict:
    overrides = {"model": {"preset": "tiny", "seq_length": SEQ},
                 "train": {"objective": "sft", "iters": 6, "micro_batch_size": 2, "global_batch_size": 4,
                           "eval_interval": 3, "eval_iters": 1},
                 "data": {"mock": False, "sft_train": files["train"], "sft_valid": files["valid"],
                          "tokenizer": files["model"], "tokenizer_type": "sentencepiece"}}
    for section, values in extra.items():
        overrides.setdefault(section, {}).update(values)
    return overrides


@functools.lru_cache(maxsize=None)
def serial_sft(files_key: tuple):
    return run_distributed(train_and_collect, 1, sft_overrides(dict(files_key)))[0]


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_sft_training_matches_one_process(sft_files, layout):
    serial = serial_sft(tuple(sorted(sft_files.items())))
    parallel = run_distributed(train_and_collect, 2, sft_overrides(sft_files, parallel=layout))[0]
    assert len(serial["loss"]) == 6 and len(serial["val_loss"]) == 2
    torch.testing.assert_close(torch.tensor(parallel["loss"]), torch.tensor(serial["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(parallel["val_loss"]), torch.tensor(serial["val_loss"]), rtol=1e-5, atol=1e-6)
    assert serial["loss"][-1] < serial["loss"][0]


def test_objective_shorthand_and_validation(sft_files):
    from engine.config import ConfigError, parse_args, validate

    cfg = parse_args(["--objective", "sft", "--data.sft_train", sft_files["train"], "--data.tokenizer", sft_files["model"]])
    assert cfg.train.objective == "sft" and validate(cfg, 1).train.objective == "sft"
    with pytest.raises(ConfigError, match="train.objective"):
        validate(parse_args(["--objective", "dpo", "--data.mock", "true"]), 1)
    with pytest.raises(ConfigError, match="data.sft_train"):
        validate(parse_args(["--objective", "sft", "--data.tokenizer", sft_files["model"]]), 1)


def test_epoch_cycle_visits_every_sample_once_per_epoch():
    from engine.sft_data import EpochCycle

    cycle = EpochCycle(list(range(7)), epochs=3, seed=5)
    epochs = [sorted(cycle[e * 7 + i] for i in range(7)) for e in range(3)]
    assert epochs == [list(range(7))] * 3
    assert [cycle[i] for i in range(7)] != [cycle[7 + i] for i in range(7)]  # reshuffled per epoch
    assert [cycle[i] for i in range(21)] == [EpochCycle(list(range(7)), 3, 5)[i] for i in range(21)]
    with pytest.raises(IndexError):
        cycle[21]

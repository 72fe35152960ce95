"""DPO in the training loop: TP x PP and DP runs equal one process (also for the
reference-free SimPO and ORPO), LoRA's reference is the
base with the adapters off, precomputed reference log-probs give the same run, and bad input
stops with one line."""
import functools
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.data.conftest import sp_model_path, write_jsonl  # noqa: F401 (fixture)
from tests.distributed import run_distributed
from tests.test_parity_tp_dp import assert_matches_serial
from tests.test_sft import docstring_records
from tests.training_harness import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 128  # the longest test pair (chat markup included) is about 90 tokens


def preference_records(limit: int) -> list:
    """Pairs from real stdlib functions: docstring -> the body's start, or its words reversed."""
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": " ".join(reversed(r["output"].split()))}
             for r in docstring_records(2 * limit)]
    return [pair for pair in pairs if pair["chosen"] != pair["rejected"]][:limit]


@pytest.fixture(scope="module")
def files(sp_model_path, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("dpo")
    records = preference_records(24)
    assert len(records) == 24
    return (sp_model_path, write_jsonl(folder / "train.jsonl", records[:20]),
            write_jsonl(folder / "valid.jsonl", records[20:]))


def dpo_overrides(files, **sections) -> dict:
    tokenizer, train, valid = files
    base = {"train": {"objective": "dpo", "iters": 4, "micro_batch_size": 1, "global_batch_size": 4,
                      "eval_interval": 2, "eval_iters": 1},
            "data": {"mock": False, "tokenizer": tokenizer, "preference_train": train, "preference_valid": valid},
            "dpo": {"beta": 0.5}, "model": {"seq_length": SEQ}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


METRICS = ("loss", "grad_norm", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "val_loss", "val_accuracy")


def dpo_train(overrides: dict) -> dict:
    """One rank's DPO run: per-step metrics and the gathered full weights."""
    from engine.config import validate
    from engine.dpo import DPOTrainer
    from engine.training import gather_model_state, shutdown

    torch.use_deterministic_algorithms(True)
    trainer = DPOTrainer(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])))
    history = trainer.train()
    weights = gather_model_state(trainer.model_chunks, trainer.grid)
    copies = trainer.reference_chunks is not None and trainer.reference_chunks is not trainer.model_chunks
    shutdown()
    return {**{key: [r[key] for r in history if key in r] for key in METRICS}, "weights": weights,
            "reference_copy": copies, "checkpoint": trainer.cfg.checkpoint.save}


@functools.lru_cache(maxsize=None)
def serial_run(files):
    """The one-process run; it also saves its final checkpoint (for the resume test)."""
    return run_distributed(dpo_train, 1, dpo_overrides(files, checkpoint={"save": tempfile.mkdtemp()}))[0]


def assert_same_run(result, serial):
    assert_matches_serial(result, serial)  # losses, grad norms and weights, at the parity tests' tolerances
    # The rewards are beta x differences of summed sequence log-probs (magnitude ~1e2), so fp32
    # summation order alone moves them by ~1e-5 absolute.
    for key in METRICS:
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(serial[key]), rtol=1e-5, atol=3e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")


def test_serial_dpo_learns_the_preference(files):
    serial = serial_run(files)
    assert serial["reference_copy"]  # without LoRA the reference is a frozen copy
    assert serial["loss"][0] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference: log 2
    assert serial["margin"][-1] > serial["margin"][1] > 0 and serial["loss"][-1] < serial["loss"][0]
    assert serial["accuracy"][-1] >= 0.75
    assert len(serial["val_loss"]) == 2


def test_resuming_a_full_dpo_run_needs_its_reference(files):
    saved = serial_run(files)["checkpoint"]
    with pytest.raises(RuntimeError, match="dpo.reference_checkpoint: resuming the DPO run in .* needs the reference"):
        run_distributed(dpo_train, 1, dpo_overrides(files, checkpoint={"load": saved}, train={"iters": 6}))


LAYOUTS = {
    "tp2_pp2": (4, {"parallel": {"tp": 2, "pp": 2}}),  # 4 micro-batches through a 2-stage pipeline (1F1B)
    "tp2_sp_pp2_vpp2": (4, {"parallel": {"tp": 2, "sp": True, "pp": 2, "vpp": 2}}),  # interleaved, sequence parallel
    "dp2_sharded": (2, {"optim": {"shard": True}}),  # the pair mean spans data-parallel ranks
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dpo_parallel_matches_serial(files, layout):
    world, overrides = LAYOUTS[layout]
    serial = serial_run(files)
    for result in run_distributed(dpo_train, world, dpo_overrides(files, **overrides)):
        assert_same_run(result, serial)


# ---- reference-free losses: SimPO and ORPO --------------------------------------------------------
# From random weights ORPO's first term, the chosen responses' NLL (about 7.6 nats a token), moves
# the rewards of both responses at first; the odds term ranks the pairs by step 8.
REFERENCE_FREE_ITERS = {"simpo": 4, "orpo": 8}


def reference_free_overrides(files, loss, **sections) -> dict:
    return dpo_overrides(files, dpo={"loss": loss, "beta": 2.0}, train={"iters": REFERENCE_FREE_ITERS[loss]}, **sections)


@functools.lru_cache(maxsize=None)
def reference_free_serial_run(files, loss):
    return run_distributed(dpo_train, 1, reference_free_overrides(files, loss))[0]


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_learn_the_preference_without_a_reference(files, loss):
    serial = reference_free_serial_run(files, loss)
    assert not serial["reference_copy"]
    assert serial["margin"][-1] > serial["margin"][0] and serial["loss"][-1] < serial["loss"][0]
    assert serial["accuracy"][-1] >= 0.75


REFERENCE_FREE_LAYOUTS = {"simpo": "tp2_sp_pp2_vpp2", "orpo": "dp2_sharded"}


@pytest.mark.parametrize("loss", sorted(REFERENCE_FREE_LAYOUTS))
def test_reference_free_losses_parallel_match_serial(files, loss):
    """Response token counts enter the loss per pair: each layout still gives the serial run."""
    world, overrides = LAYOUTS[REFERENCE_FREE_LAYOUTS[loss]]
    serial = reference_free_serial_run(files, loss)
    for result in run_distributed(dpo_train, world, reference_free_overrides(files, loss, **overrides)):
        assert_same_run(result, serial)


# ---- LoRA: the reference is the base, run through the same modules with the adapters off ------
LORA = {"method": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ["q", "v", "o", "gate", "up", "down"]}


def lora_reference(overrides: dict) -> dict:
    from engine.config import validate
    from engine.dpo import DPOTrainer
    from engine.dpo_loss import sequence_logps
    from engine.training import shutdown
    from models.gpt import GPTModel
    from parallel.random import RNGTracker

    cfg = validate(tiny_config(overrides), 1)
    trainer = DPOTrainer(cfg)
    trainer.train()
    batches = trainer.microbatches(trainer.train_data, 0)
    trainer.model.train()
    trainer.attach_reference_logps(batches)
    with torch.no_grad():
        policy = trainer.sequence_logps_step(trainer.model_chunks, batches)(0, 0, None)
        base = GPTModel(cfg.model, trainer.grid.tp_group, RNGTracker("cpu")).eval()
        base.init_weights(cfg.train.seed)  # the weights the run started from (no adapters)
        plain = sequence_logps(base(batches[0]["tokens"], labels=batches[0]["labels"]), batches[0]["loss_mask"])
    result = {"shared": trainer.reference_chunks is trainer.model_chunks, "reference": batches[0]["reference_logps"],
              "policy": policy, "plain": plain, "training": trainer.model.training}
    shutdown()
    return result


def test_lora_reference_is_the_base_with_adapters_off(files):
    result = run_distributed(lora_reference, 1, dpo_overrides(files, finetune=LORA))[0]
    assert result["shared"]  # no second copy of the weights
    torch.testing.assert_close(result["reference"], result["plain"], rtol=1e-5, atol=1e-5)
    assert (result["policy"] - result["plain"]).abs().max() > 1e-2  # the trained adapters do change the policy
    assert result["training"]  # the reference pass puts the policy back in training mode


# ---- precomputed reference log-probs --------------------------------------------------------------
def write_reference(overrides: dict, out: str) -> None:
    from engine.config import validate
    from tools.dpo_reference_logps import write_reference_logps_for

    write_reference_logps_for(validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"])), out)


def test_precomputed_reference_gives_the_same_run(files, tmp_path):
    out = str(tmp_path / "reference")
    run_distributed(write_reference, 2, dpo_overrides(files, parallel={"pp": 2}), out)  # written at another layout
    assert sorted(os.listdir(out)) == ["train.npz", "valid.npz"]
    result = run_distributed(dpo_train, 1, dpo_overrides(files, dpo={"reference_logps": out}))[0]
    assert not result["reference_copy"]
    assert_same_run(result, serial_run(files))


def test_reference_logps_of_other_data_are_refused(files, tmp_path):
    from engine.config import ConfigError, validate
    from engine.dpo_data import build_preference_datasets, reference_file, write_reference_logps

    tokenizer, train, _ = files
    other = write_jsonl(tmp_path / "other.jsonl", preference_records(3))
    cfg = validate(tiny_config(dpo_overrides((tokenizer, other, ""), train={"eval_interval": 0},
                                             dpo={"reference_logps": str(tmp_path)})), 1)
    cfg.dpo.reference_logps = ""
    dataset = build_preference_datasets(cfg)[0].base
    write_reference_logps(reference_file(str(tmp_path), "train"), torch.zeros(3, 2).numpy(), dataset)
    cfg.dpo.reference_logps, cfg.data.preference_train = str(tmp_path), train
    with pytest.raises(ConfigError, match="dpo.reference_logps: .*train.npz was computed for other preference pairs"):
        build_preference_datasets(cfg)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, values, message", [
    ("data", {"preference_train": ""}, "data.preference_train: train.objective dpo needs a JSONL file"),
    ("dpo", {"loss": "kto"}, "dpo.loss: must be one of sigmoid, ipo, hinge, simpo, orpo; got 'kto'"),
    ("dpo", {"loss": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing: applies to the sigmoid and simpo losses only"),
    ("dpo", {"loss": "orpo", "label_smoothing": 0.1}, "dpo.label_smoothing: applies to the sigmoid and simpo losses only"),
    ("dpo", {"loss": "simpo", "simpo_gamma": -1.0}, "dpo.simpo_gamma: must be non-negative"),
    ("dpo", {"loss": "simpo", "reference_logps": "runs/ref"}, "dpo.reference_logps: dpo.loss simpo uses no reference model"),
    ("dpo", {"loss": "orpo", "reference_checkpoint": "ckpt"}, "dpo.reference_checkpoint: dpo.loss orpo uses no reference"),
    ("dpo", {"beta": 0.0}, "dpo.beta: must be positive"),
    ("data", {"preference_valid": ""}, "data.preference_valid: train.eval_interval is set but there is no validation JSONL"),
])
def test_config_errors(files, section, values, message):
    from engine.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(dpo_overrides(files, **{section: values})), 1)


def test_bad_pair_stops_the_run_with_one_line(files, tmp_path):
    long_prompt = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}, long_prompt])
    args = ["--objective", "dpo", "--data.preference_train", bad, "--data.tokenizer", files[0],
            "--train.device", "cpu", "--model.seq_length", str(SEQ), "--train.output_dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py")] + args,
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert re.fullmatch(rf"error: data.preference_train: {bad}:2: line has a prompt of \d+ tokens, leaving no "
                        rf"room for a response within seq_length {SEQ}\.", result.stderr.strip())


def test_empty_response_names_key_file_and_line(files, tmp_path):
    from engine.config import ConfigError, validate
    from engine.dpo_data import build_preference_datasets

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Name a prime.", "chosen": "7", "rejected": " "}])
    cfg = validate(tiny_config(dpo_overrides((files[0], bad, ""), train={"eval_interval": 0})), 1)
    with pytest.raises(ConfigError, match=rf"data.preference_train: {bad}:1: line has an empty 'rejected' response"):
        build_preference_datasets(cfg)

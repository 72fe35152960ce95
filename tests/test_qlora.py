"""QLoRA (finetune.method qlora): LoRA adapters over NF4 bases, started from a pretrained base
(finetune.base), with adapters-only checkpoints.

The comparison is exact: NF4 blocks are cut per TP shard, so the TP=2 (and TP=2 x PP=2) QLoRA
runs are compared with one process running plain LoRA on the same base values, namely every linear replaced by
the NF4 round trip of its TP=2 shards (quantise each shard, dequantise, reassemble). Forward,
backward and updates then see the same numbers, and only fp32 summation order differs."""
import dataclasses
import functools
import json
import os

import pytest
import torch

from parallel import nf4
from tests.distributed import run_distributed

ADAPTERS = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ["q", "v", "o", "gate", "up", "down"]}
ITERS = 6
LAYOUTS = {"tp2": (2, {"parallel": {"tp": 2}}), "tp2_pp2": (4, {"parallel": {"tp": 2, "pp": 2}})}


def tp_round_trip(full: torch.Tensor, spec, tp: int, double_quant: bool) -> torch.Tensor:
    """`full` with each of its TP shards (at size tp) sent through NF4 and back."""
    out = torch.empty_like(full)
    for rank in range(tp):
        shard = dataclasses.replace(spec, rank=rank, size=tp)
        values, offset = nf4.dequantize(nf4.NF4Weight(shard.slice(full), double_quant)), 0
        for start, length in shard.local_slices():
            out.narrow(spec.dim, start, length).copy_(values.narrow(spec.dim, offset, length))
            offset += length
    return out


def linears(trainer) -> dict:
    from parallel.layers import ColumnParallelLinear, RowParallelLinear

    return {name: module for chunk in trainer.model_chunks for name, module in chunk.named_modules()
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear))}


def nf4_buffers(trainer) -> dict:
    return {name: [b.clone() for b in module.nf4.buffers()] for name, module in linears(trainer).items()
            if module.weight is None}


def qlora_run(overrides: dict, round_trip_tp: int = 0) -> dict:
    """Train ITERS steps; round_trip_tp > 0 first replaces every full-precision linear by the
    NF4 round trip of its shards at that TP size (the serial reference)."""
    from engine.config import validate
    from engine.training import Trainer, gather_model_state, shutdown
    from tests.training_harness import tiny_config

    torch.use_deterministic_algorithms(True)
    trainer = Trainer(validate(tiny_config({"train": {"iters": ITERS}, **overrides}), int(os.environ["WORLD_SIZE"])))
    with torch.no_grad():
        for module in linears(trainer).values():
            if round_trip_tp and module.weight is not None:
                module.weight.copy_(tp_round_trip(module.weight, module.weight.shard_spec, round_trip_tp, True))
    trainable = sorted(n for c in trainer.model_chunks for n, p in c.named_parameters() if p.requires_grad)
    before = {name: value.clone() for name, value in gather_model_state(trainer.model_chunks, trainer.grid).items()}
    quantized = nf4_buffers(trainer)
    history = trainer.train()
    after = gather_model_state(trainer.model_chunks, trainer.grid)
    nf4_unchanged = all(torch.equal(x, y) for name, bufs in nf4_buffers(trainer).items()
                        for x, y in zip(bufs, quantized[name]))
    shutdown()
    return {"loss": [r["loss"] for r in history], "before": before, "after": after, "trainable": trainable,
            "quantized": sorted(quantized), "nf4_unchanged": nf4_unchanged}


@functools.lru_cache(maxsize=None)
def serial_reference():
    from tests.training_harness import pretrained_base

    return run_distributed(qlora_run, 1, {"finetune": {**ADAPTERS, "method": "lora", "base": pretrained_base()}}, 2)[0]


@functools.lru_cache(maxsize=None)
def parallel_qlora(layout: str, save_dir: str = ""):
    """QLoRA at a layout of LAYOUTS; with save_dir, checkpoints every 3 steps."""
    from tests.training_harness import pretrained_base

    world, overrides = LAYOUTS[layout]
    saving = {"checkpoint": {"save": save_dir, "interval": 3}} if save_dir else {}
    return run_distributed(qlora_run, world, {"finetune": {**ADAPTERS, "method": "qlora", "base": pretrained_base()},
                                              **overrides, **saving})


def tp2_qlora(save_dir: str):
    return parallel_qlora("tp2", save_dir)


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qlora"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_qlora_equals_serial_lora_on_the_tp2_round_tripped_base(layout, save_dir):
    from tests.training_harness import pretrained_base_run

    serial, base_weights = serial_reference(), pretrained_base_run()[1]
    pp = LAYOUTS[layout][1]["parallel"].get("pp", 1)
    for result in tp2_qlora(save_dir) if layout == "tp2" else parallel_qlora(layout):
        # every TP linear of this rank's pipeline stage is quantised, and never written
        assert len(result["quantized"]) == 16 // pp and result["nf4_unchanged"]
        assert result["trainable"] and all(n.endswith((".lora_A", ".lora_B")) for n in result["trainable"])
        torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(serial["loss"]), rtol=1e-5, atol=1e-6)
        for name, value in result["after"].items():
            torch.testing.assert_close(value, serial["after"][name], rtol=1e-3, atol=2e-4, msg=name)
            assert (value - serial["after"][name]).pow(2).mean().sqrt() < 2e-6, name
            if not name.endswith((".lora_A", ".lora_B")):  # the base: loaded from finetune.base, frozen
                assert torch.equal(result["before"][name], base_weights[name]), name
                assert torch.equal(value, result["before"][name]), name
    assert serial["after"]["layers.0.attn.qkv.lora_B"].abs().max() > 1e-4  # the adapters did train
    assert torch.equal(serial["before"]["embedding.weight"], base_weights["embedding.weight"])  # LoRA from the base


def test_qlora_checkpoint_holds_adapters_only_and_resumes(save_dir):
    from engine.checkpoint import stored_shapes
    from tests.training_harness import pretrained_base

    straight = tp2_qlora(save_dir)[0]
    step_dir = os.path.join(save_dir, "step_000003")
    model_keys = [k for k in stored_shapes(step_dir) if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    with open(os.path.join(step_dir, "trellis.json")) as handle:
        assert json.load(handle)["trainable_only"] is True
    # Resume: the base is read from finetune.base and quantised again, the adapters from the run.
    overrides = {"finetune": {**ADAPTERS, "method": "qlora", "base": pretrained_base()}, "parallel": {"tp": 2},
                 "checkpoint": {"load": save_dir, "load_step": 3}}
    resumed = run_distributed(qlora_run, 2, overrides)[0]
    assert resumed["loss"] == straight["loss"][3:]


def misuse(adapter_ckpt: str, base: str) -> list:
    """The one-line errors of the ways a fine-tune can be pointed at the wrong checkpoint."""
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError, validate
    from engine.training import Trainer
    from tests.training_harness import tiny_config

    cases = [{"finetune": {**ADAPTERS, "method": "qlora"}, "checkpoint": {"load": adapter_ckpt}},
             {"finetune": {**ADAPTERS, "method": "qlora", "base": adapter_ckpt}},
             {"finetune": {**ADAPTERS, "method": "lora"}, "checkpoint": {"load": base}},
             {"finetune": {**ADAPTERS, "method": "qlora", "qlora_targets": ["layers.*.nothing"]}}]
    messages = []
    for overrides in cases:
        try:
            Trainer(validate(tiny_config(overrides), 1))
            messages.append("")
        except (CheckpointError, ConfigError) as error:
            messages.append(str(error))
    return messages


def test_wrong_checkpoints_give_one_line_errors(save_dir):
    from engine.config import ConfigError, validate
    from tests.training_harness import pretrained_base, tiny_config

    tp2_qlora(save_dir)
    resume, adapters_as_base, model_as_resume, no_match = run_distributed(misuse, 1, save_dir, pretrained_base())[0]
    assert f"resume with --finetune.base {pretrained_base()}" in resume
    assert "holds only the adapters" in adapters_as_base
    assert "holds no LoRA adapters" in model_as_resume and "--finetune.base" in model_as_resume
    assert "finetune.qlora_targets" in no_match
    with pytest.raises(ConfigError, match="finetune.base"):
        validate(tiny_config({"finetune": {"method": "qlora", "base": pretrained_base()},
                              "checkpoint": {"load": pretrained_base(), "load_model_only": True}}), 1)

"""LoRA on the tensor-parallel linears: TP (and TP x PP) training equals one process, only the
adapters train, and merged weights give the base + adapter output."""
import functools

import pytest
import torch

from tests.distributed import run_distributed

# q and v are two of qkv's three fused blocks (B holds rows only for them); gate+up cover all
# of fc1; o and down are row-parallel.
TARGETS = ["q", "v", "o", "gate", "up", "down"]
LORA = {"method": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": TARGETS}


def lora_train(overrides: dict) -> dict:
    """Losses and the gathered full weights before and after 10 LoRA steps, on one rank."""
    import os

    from engine.config import validate
    from engine.training import Trainer, gather_model_state, shutdown
    from tests.training_harness import tiny_config

    torch.use_deterministic_algorithms(True)
    cfg = validate(tiny_config({"finetune": LORA, **overrides}), int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    trainable = sorted(n for c in trainer.model_chunks for n, p in c.named_parameters() if p.requires_grad)
    # Clone: a replicated parameter's gathered tensor is the live parameter itself.
    before = {name: value.clone() for name, value in gather_model_state(trainer.model_chunks, trainer.grid).items()}
    history = trainer.train()
    after = gather_model_state(trainer.model_chunks, trainer.grid)
    shutdown()
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
            "before": before, "after": after, "trainable": trainable}


@functools.lru_cache(maxsize=None)
def serial_lora():
    return run_distributed(lora_train, 1, {})[0]


def assert_same_run(result, serial):
    torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(serial["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["grad_norm"]), torch.tensor(serial["grad_norm"]),
                               rtol=1e-4, atol=1e-6)
    assert result["after"].keys() == serial["after"].keys()
    for name, full in serial["after"].items():
        torch.testing.assert_close(result["after"][name], full, rtol=1e-3, atol=2e-4, msg=name)
        rms = (result["after"][name] - full).pow(2).mean().sqrt()
        assert rms < 2e-6, f"{name}: RMS difference {rms:.2e}"


def test_serial_lora_trains_only_adapters():
    serial = serial_lora()
    # Mock tokens give LoRA little to learn in 10 steps; check that it really trains instead.
    assert min(serial["grad_norm"]) > 0.05 and len(set(serial["loss"])) > 1
    assert serial["trainable"] and all(n.endswith((".lora_A", ".lora_B")) for n in serial["trainable"])
    assert len(serial["trainable"]) == 2 * 4 * 4  # 4 layers x (qkv, proj, fc1, fc2) x (A, B)
    for name, value in serial["before"].items():
        changed = not torch.equal(value, serial["after"][name])
        assert changed == name.endswith((".lora_A", ".lora_B")), f"{name} changed={changed}"
    assert serial["before"]["layers.0.attn.qkv.lora_B"].abs().max() == 0  # B starts at zero
    assert serial["after"]["layers.0.attn.qkv.lora_B"].abs().max() > 1e-3  # and moves off it
    assert serial["after"]["layers.0.attn.qkv.lora_B"].shape == (64 + 32, 4)  # q and v rows only


LAYOUTS = {
    "tp2": (2, {"parallel": {"tp": 2}}),
    "tp2_sp": (2, {"parallel": {"tp": 2, "sp": True}}),
    "tp2_pp2": (4, {"parallel": {"tp": 2, "pp": 2}}),
    "tp2_dp2_sharded": (4, {"parallel": {"tp": 2}, "optim": {"shard": True}}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lora_parallel_matches_serial(layout):
    world, overrides = LAYOUTS[layout]
    serial = serial_lora()
    for result in run_distributed(lora_train, world, overrides):
        assert_same_run(result, serial)
        for name, value in result["before"].items():
            if not name.endswith((".lora_A", ".lora_B")):
                assert torch.equal(value, result["after"][name]), f"frozen {name} changed"


def merge_check(tp: int, sp: bool) -> dict:
    """Logits of base + adapters (B non-zero) and of the merged model, with full weights."""
    import os

    from models.config import ModelConfig, resolve_preset
    from models.gpt import GPTModel
    from models.transformer import lora_aliases
    from parallel.grid import build_grid, init_distributed
    from parallel.lora import LoRALinearFn, adapter_parameters, apply_lora, merge_lora
    from parallel.random import RNGTracker
    from parallel.sharding import init_from_full

    torch.use_deterministic_algorithms(True)
    device = init_distributed("cpu", 60)
    grid = build_grid(tp, 1, 1, device)
    cfg = ModelConfig(preset="tiny")
    resolve_preset(cfg)
    model = GPTModel(cfg, grid.tp_group, RNGTracker(device), sequence_parallel=sp)
    model.init_weights(3)
    apply_lora(model, TARGETS, 4, 8.0, rslora=True, seed=3, aliases=lora_aliases(cfg))
    for name, param in adapter_parameters(model).items():
        if name.endswith("lora_B"):
            init_from_full(param, name, 3, 0.05)  # B = 0 would make the adapter invisible
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(tokens)
        merged_names = merge_lora(model)
        merged = model(tokens)
    from parallel.mappings import gather_from_tp
    assert not adapter_parameters(model)
    assert not any(isinstance(getattr(m, "linear_fn", None), LoRALinearFn) for m in model.modules())
    result = {"adapted": gather_from_tp(adapted, grid.tp_group), "merged": gather_from_tp(merged, grid.tp_group),
              "merged_names": merged_names, "world": int(os.environ["WORLD_SIZE"])}
    torch.distributed.destroy_process_group()
    return result


def test_merged_model_equals_base_plus_adapter():
    serial = run_distributed(merge_check, 1, 1, False)[0]
    assert len(serial["merged_names"]) == 16
    torch.testing.assert_close(serial["merged"], serial["adapted"], rtol=1e-5, atol=1e-5)
    for result in run_distributed(merge_check, 2, 2, True):
        torch.testing.assert_close(result["adapted"], serial["adapted"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["merged"], serial["adapted"], rtol=1e-5, atol=1e-5)


def test_lora_config_errors():
    from engine.config import ConfigError, validate
    from tests.training_harness import tiny_config

    bad = [({"method": "dora"}, "finetune.method"), ({**LORA, "lora_rank": 0}, "finetune.lora_rank"),
           ({**LORA, "lora_targets": []}, "finetune.lora_targets"),
           ({**LORA, "lora_dropout": 1.0}, "finetune.lora_dropout")]
    for finetune, key in bad:
        with pytest.raises(ConfigError, match=key):
            validate(tiny_config({"finetune": finetune}), 1)
    validate(tiny_config({"finetune": LORA}), 1)


def test_lora_scaling():
    from parallel.lora import lora_scale

    assert lora_scale(16.0, 4, rslora=False) == 4.0
    assert lora_scale(16.0, 4, rslora=True) == 8.0


def test_lora_checkpoint_reshards_from_tp2_to_one_process(tmp_path):
    """Adapters are saved under global keys, and alone: a TP=2 checkpoint resumes in one
    process (the base here is the seeded initialisation, rebuilt on load)."""
    from engine.checkpoint import stored_shapes
    from tests.training_harness import train_and_collect

    base = {"finetune": LORA, "train": {"iters": 6}}
    straight = run_distributed(train_and_collect, 2, {**base, "parallel": {"tp": 2},
                                                      "checkpoint": {"save": str(tmp_path), "interval": 3}}, False)[0]
    model_keys = [k for k in stored_shapes(str(tmp_path / "step_000003")) if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    resumed = run_distributed(train_and_collect, 1, {**base, "checkpoint": {"load": str(tmp_path), "load_step": 3}},
                              False)[0]
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(straight["loss"][3:]), rtol=1e-5, atol=1e-6)


def checkpoint_keys(tp: int) -> list:
    """Global keys of the adapters of a 1-layer model (q and v of qkv, all of fc1), at TP=tp."""
    from engine.checkpoint_state import model_entries
    from models.config import ModelConfig, resolve_preset
    from models.gpt import GPTModel
    from models.transformer import lora_aliases
    from parallel.grid import build_grid, init_distributed
    from parallel.lora import apply_lora
    from parallel.random import RNGTracker

    device = init_distributed("cpu", 60)
    grid = build_grid(tp, 1, 1, device)
    cfg = ModelConfig(preset="tiny", num_layers=1)
    resolve_preset(cfg)
    model = GPTModel(cfg, grid.tp_group, RNGTracker(device))
    apply_lora(model, ["q", "v", "gate", "up", "o"], 4, 8.0, aliases=lora_aliases(cfg))
    keys = sorted(k for k in model_entries([model], grid.mesh["tp"], for_load=False) if "lora" in k)
    torch.distributed.destroy_process_group()
    return keys


def test_adapter_checkpoint_keys_name_their_blocks():
    expected = ["model.layers.0.attn.proj.lora_A", "model.layers.0.attn.proj.lora_B",
                "model.layers.0.attn.qkv.lora_A", "model.layers.0.attn.qkv.lora_B.q", "model.layers.0.attn.qkv.lora_B.v",
                "model.layers.0.mlp.fc1.lora_A", "model.layers.0.mlp.fc1.lora_B.gate", "model.layers.0.mlp.fc1.lora_B.up"]
    for tp in (1, 2):
        assert run_distributed(checkpoint_keys, tp, tp) == [expected] * tp


def eval_logits(overrides: dict) -> torch.Tensor:
    """Full logits of the model a (validated tiny) config builds, on fixed tokens, in eval mode."""
    import os

    from engine.config import validate
    from engine.training import Trainer, shutdown
    from parallel.mappings import gather_from_tp
    from tests.training_harness import tiny_config

    cfg = validate(tiny_config(overrides), int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    model = trainer.model.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gather_from_tp(model(tokens), trainer.grid.tp_group)
    shutdown()
    return logits


def test_merge_lora_tool_folds_a_tp2_checkpoint(tmp_path):
    """Train adapters at TP=2 on a pretrained base, merge the adapters-only checkpoint offline
    into that base, and the plain merged model gives the adapted model's logits."""
    from tests.training_harness import pretrained_base, train_and_collect
    from tools.merge_lora import merge_checkpoint

    base, lora_ckpt, merged_ckpt = pretrained_base(), str(tmp_path / "lora"), str(tmp_path / "merged")
    lora = {**LORA, "base": base}
    run_distributed(train_and_collect, 2, {"finetune": lora, "parallel": {"tp": 2}, "train": {"iters": 3},
                                           "checkpoint": {"save": lora_ckpt}}, False)
    merge_checkpoint(lora_ckpt, merged_ckpt)  # the base is found from the run's finetune.base
    adapted = run_distributed(eval_logits, 1, {"finetune": lora, "checkpoint": {"load": lora_ckpt}})[0]
    merged = run_distributed(eval_logits, 1, {"checkpoint": {"load": merged_ckpt}})[0]
    plain_base = run_distributed(eval_logits, 1, {"checkpoint": {"load": base}})[0]
    assert (adapted - plain_base).abs().max() > 1e-4, "the adapters should have moved the logits"
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_peft_export_loads_in_peft_with_our_logits(tmp_path):
    """Adapters trained at TP=2, exported in PEFT's format beside the base converted to HF:
    transformers + peft give the logits of our adapted model (fp32)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.training_harness import pretrained_base, train_and_collect
    from tools.convert_checkpoint import trellis_to_hf
    from tools.export_peft import export_peft

    lora_ckpt, hf_dir, adapter_dir = str(tmp_path / "lora"), str(tmp_path / "hf"), str(tmp_path / "adapter")
    lora = {**LORA, "base": pretrained_base()}
    run_distributed(train_and_collect, 2, {"finetune": lora, "parallel": {"tp": 2}, "train": {"iters": 3},
                                           "checkpoint": {"save": lora_ckpt}}, False)
    trellis_to_hf(pretrained_base(), hf_dir)
    export_peft(lora_ckpt, adapter_dir)
    ours = run_distributed(eval_logits, 1, {"finetune": lora, "checkpoint": {"load": lora_ckpt}})[0]
    plain_base = run_distributed(eval_logits, 1, {"checkpoint": {"load": pretrained_base()}})[0]
    assert (ours - plain_base).abs().max() > 1e-4, "the adapters should have moved the logits"

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    seq, batch, vocab = ours.shape
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours.permute(1, 0, 2)[..., :theirs.shape[-1]], rtol=1e-4, atol=1e-4)

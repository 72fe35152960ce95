"""tools/bench_finetune.py runs every mode end to end on a tiny model on the CPU (a check of the
script; its numbers are not measurements and nothing here compares timings)."""
import pytest

from tests.distributed import run_distributed

CPU_ARGS = ["--device", "cpu", "--preset", "tiny", "--qlora-preset", "tiny", "--seq", "64", "--micro-batch", "2",
            "--steps", "1", "--warmup", "1", "--galore-rank", "8"]


def run_bench(argv: list) -> list:
    from tools.bench_finetune import main

    return main(argv)


def test_bench_finetune_runs_every_mode_on_cpu():
    pytest.importorskip("peft")
    rows = run_distributed(run_bench, 1, CPU_ARGS + ["--mode", "lora", "qlora", "galore"])[0]
    assert [(r["mode"], r["stack"]) for r in rows] == [
        ("lora", "trellis"), ("lora", "hf+peft"), ("qlora", "trellis"), ("galore", "adamw"), ("galore", "galore_adamw")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_hf"] == rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    assert 0 < rows[2]["nf4_gib"] < rows[2]["same_weights_bf16_gib"] / 3  # 0.52 of 2 bytes per weight
    # The GaLore state count of test_galore.py (tiny, rank 8): 745,984 bytes against AdamW's
    # 2,003,456 plus AdamW's 27 4-byte step counters.
    assert rows[4]["optimizer_state_gib"] * 2**30 == 745984
    assert rows[3]["optimizer_state_gib"] * 2**30 == 2003456 + 27 * 4


def test_hf_qlora_baseline_is_the_qlora_recipe():
    """The hf+peft+bnb row's model (it runs only on CUDA in the benchmark; bitsandbytes also
    quantises and trains on the CPU): every projection NF4, double-quantised, blocksize 64, bf16
    compute, wrapped by PEFT's bitsandbytes LoRA layer; only the adapters train, the rest stays
    bf16; checkpointing on; a step gives every adapter B a gradient."""
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from engine.config import parse_args, validate
    from tools.baselines import HF_LORA_MODULES, hf_qlora_llama

    cfg = validate(parse_args(["--model.preset", "tiny", "--data.mock", "true", "--train.device", "cpu"]), 1)
    torch.manual_seed(0)
    wrapped = hf_qlora_llama(cfg.model, list(HF_LORA_MODULES), 4, 8, torch.device("cpu"))
    model = wrapped.inner.base_model.model
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer")]
    assert len(bases) == 7 * cfg.model.num_layers
    for base in bases:
        assert isinstance(base, bnb.nn.Linear4bit) and base.compute_dtype == torch.bfloat16
        state = base.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    trained = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {p.dtype for n, p in wrapped.named_parameters() if n not in trained and p.dtype != torch.uint8} == {
        torch.bfloat16}
    assert model.is_gradient_checkpointing and not model.config.use_cache
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33))
    wrapped(tokens[:, :-1], tokens[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)

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

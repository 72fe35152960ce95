"""tools/benchmark.py counts the FLOPs of the work a step must do: LoRA's frozen base weights
take no weight gradient (4 FLOPs per weight and token, not 6), its adapters are trained."""
import types

from tests.distributed import run_distributed

# tiny: 4 layers, hidden 64, 2 KV heads of 16. q, k and v together adapt the whole fused qkv
# (one A [4, 64], one B [64 + 32 + 32, 4]); o: A [4, 64], B [64, 4].
TINY_ADAPTER_PARAMS = 4 * ((4 * 64 + 128 * 4) + (4 * 64 + 64 * 4))


def _flops(method: str, pp: int) -> tuple:
    from tools.benchmark import run_trellis

    args = types.SimpleNamespace(preset="tiny", seq=64, micro_batch=2, global_batch=0, warmup=0, steps=1, tp=1,
                                 pp=pp, profile="", idle="")
    extra = ["--train.device", "cpu", "--train.precision", "fp32"]
    if method != "none":
        extra += ["--finetune.method", method, "--finetune.lora_rank", "4", "--finetune.lora_targets", "q k v o"]
    cfg, _, row = run_trellis(args, extra)
    return row["flops_per_token"], cfg.model.flops_per_token(), cfg.model.matmul_params()


def test_lora_counts_frozen_weights_without_their_weight_gradient():
    for pp in (1, 2):
        flops, full, matmul = run_distributed(_flops, pp, "lora", pp)[0]
        assert flops == full - 2.0 * matmul + 6.0 * TINY_ADAPTER_PARAMS, pp
    flops, full, _ = run_distributed(_flops, 1, "none", 1)[0]
    assert flops == full

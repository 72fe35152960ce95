"""tools/kernel_breakdown.py: kernels sorted into kinds by name, summed per kind, shares that add
up to the profiler's total; and `tools/benchmark.py --profile` writing it on a CPU run."""
import pytest

from tests.distributed import run_distributed
from tools import kernel_breakdown as kb

# Kernel names as torch.profiler reported them in a llama-1.3b step on an H200.
KERNELS = [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 495.6, 1600),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga", 182.2, 384),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*, void const*)", 13.9, 384),
    ("void trellis::swiglu_backward_kernel<__nv_bfloat16>(__nv_bfloat16 const*)", 42.5, 384),
    ("void trellis::norm_backward_kernel<__nv_bfloat16, __nv_bfloat16, 2, false, true, 1>", 31.6, 784),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedAdamW>", 26.6, 136),
    ("triton_poi_fused__to_copy_arange_bitwise_and_bitwise_not_div_eq_exp_mul_sub_unsqueeze_0", 6.5, 64),
    ("Memset (Device)", 2.0, 500),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", 4.0, 10),
    ("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>>", 7.4, 800),
]


def test_each_kernel_gets_its_kind():
    kinds = [kb.kind_of(name) for name, _, _ in KERNELS]
    assert kinds == ["GEMM", "attention", "attention", "Trellis kernels", "Trellis kernels", "optimizer and foreach",
                     "torch.compile (Triton)", "memset and memcpy", "communication", kb.OTHER]
    # FlashAttention-4's CuTe kernels carry "cutlass" in their names, as GEMMs do
    assert kb.kind_of("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at_...") \
        == "attention"


def test_breakdown_sums_per_kind_largest_first_and_keeps_the_total():
    rows = kb.breakdown(KERNELS)
    assert [kind for kind, _, _ in rows][:3] == ["GEMM", "attention", "Trellis kernels"]
    assert dict((kind, (round(t, 6), n)) for kind, t, n in rows)["Trellis kernels"] == (74.1, 1168)
    assert sum(t for _, t, _ in rows) == pytest.approx(sum(t for _, t, _ in KERNELS))
    table = kb.format_breakdown(rows, steps=2)
    assert "| GEMM | 0.25 | 61.0% | 800 |" in table  # 495.6 us of 812.3, over 2 steps
    assert table.startswith("Device time by kind of kernel, 0.4 ms per step over 2 steps")


def test_device_kernels_skips_cpu_events_and_annotation_spans():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device, annotation=False):
        return SimpleNamespace(key=key, device_type=device, is_user_annotation=annotation,
                               self_device_time_total=10.0, count=1)

    prof = SimpleNamespace(key_averages=lambda: [
        event("aten::mm", DeviceType.CPU), event("nvjet_sm90_tst", DeviceType.CUDA),
        event("Optimizer.step#AdamW.step", DeviceType.CUDA, annotation=True)])
    assert kb.device_kernels(prof) == [("nvjet_sm90_tst", 10.0, 1)]


def test_no_kernels_says_so():
    assert "no breakdown" in kb.format_breakdown([], steps=2)


def _profile_tiny(path: str) -> tuple:
    import json

    from tools import benchmark

    benchmark.main(["--preset", "tiny", "--seq", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "1",
                    "--profile", path, "--out", path + ".json", "--train.device", "cpu"])
    with open(path) as handle, open(path + ".json") as report:
        return handle.read(), json.load(report)


def test_benchmark_profile_writes_the_breakdown_and_the_table(tmp_path):
    text, report = run_distributed(_profile_tiny, 1, str(tmp_path / "profile.txt"))[0]
    assert text.startswith("No GPU kernels were recorded")
    assert "Self CPU" in text  # torch.profiler's own table follows
    assert report["kernels"]["attention_backend"] == "auto" and "flash_attn" in report["kernels"]
    assert "transformer_engine" in report["kernels"]
    assert report["rows"][0]["name"] == "trellis"

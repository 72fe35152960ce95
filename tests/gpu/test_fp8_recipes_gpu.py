"""The FP8 recipes on a GPU: the compiled quantisation equals the eager one bit for bit, and
every recipe's linear (forward, input and weight gradients, the weight's into fp32 main_grad)
stays close to the bf16 one on shapes of real layers.
Run on a CUDA machine with FP8 (sm89+): `python3 -m pytest tests/gpu/test_fp8_recipes_gpu.py -q`."""
import pytest
import torch

from csrc import loader
from parallel.fp8 import E4M3, E5M2, FP8Recipe, fast_quantize, fp8_linear_fn, quantize_both_layouts, tensor_amax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA GPU with FP8")
RECIPES = {"hybrid-tensor": FP8Recipe(), "e4m3-tensor": FP8Recipe(grad_dtype=E4M3),
           "hybrid-row": FP8Recipe(rowwise=True), "e4m3-row": FP8Recipe(grad_dtype=E4M3, rowwise=True),
           "hybrid-tensor-history": FP8Recipe(amax_history=4)}


def as_bytes(t):
    """FP8 tensors as their bytes, so that equality is bit for bit; other tensors as they are."""
    return t.view(torch.uint8) if t.dtype in (E4M3, E5M2) else t


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("shape", [(4096, 2048), (1000, 5632), (96, 16384)])
def test_compiled_quantisation_equals_eager(shape, dtype, rowwise):
    torch.manual_seed(0)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
    got, expected = fast_quantize(x, dtype, rowwise=rowwise), quantize_both_layouts(x, dtype, rowwise=rowwise)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.stride() == e.stride()
        if g.dtype in (E4M3, E5M2):
            # One rounding step apart at most where the fused kernel computes x * scale in another order.
            assert (g.float() - e.float()).abs().le(e.float().abs() * 0.13 + 1e-6).all()
        else:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("shape", [(4096, 2048), (1008, 5632), (96, 16384), (48, 80), (16, 16)])
@pytest.mark.parametrize("given_amax", [False, True], ids=["own-amax", "history-amax"])
def test_cast_kernel_equals_the_reference_bit_for_bit(shape, dtype, x_dtype, given_amax):
    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 3).to(x_dtype)
    x[0, 0] = 1e4  # saturates the format when the given amax is smaller
    amax = torch.tensor(50.0, device="cuda") if given_amax else None
    assert loader.fp8_cast_supported(x)
    got = loader.fp8_cast_both_layouts(x, dtype, amax)
    expected = quantize_both_layouts(x, dtype, amax)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.stride() == e.stride() and g.dtype == e.dtype
        assert torch.equal(as_bytes(g), as_bytes(e))
    assert torch.equal(tensor_amax(x), x.abs().amax().float())


def test_back_to_back_casts_read_each_fresh_amax():
    """On Hopper the cast launch overlaps the end of the amax kernel before it, and must wait
    for that amax: casts of a tensor rescaled between them, queued with no synchronisation,
    each equal the reference bit for bit."""
    base = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    queued = []
    for k in range(12):
        x = base * (1.0 + k)  # a new amax each time
        queued.append((x, loader.fp8_cast_both_layouts(x, E4M3)))
    for x, got in queued:
        for g, e in zip(got, quantize_both_layouts(x, E4M3)):
            assert torch.equal(as_bytes(g), as_bytes(e))


def test_cast_kernel_keeps_nan_and_takes_only_what_it_can():
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    x[5, 7] = float("nan")
    assert torch.isnan(loader.fp8_amax(x)).all()
    assert torch.isnan(loader.fp8_cast_both_layouts(x, E4M3)[1])
    for unsupported in (torch.randn(40, 64, device="cuda"), torch.randn(64, 64, device="cuda").t(),
                        torch.randn(64, 64, device="cuda").to(torch.float64)):
        assert not loader.fp8_cast_supported(unsupported)
    # A size in the message raises (streaming an integer into TORCH_CHECK once crashed instead).
    with pytest.raises(RuntimeError, match="got 40 x 64"):
        loader.kernels().fp8_cast_transpose(torch.zeros(40, 64, device="cuda"), torch.ones(1, device="cuda"), False)


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_stays_close_to_bf16(name):
    torch.manual_seed(1)
    tokens, fan_in, fan_out = 2048, 2048, 5632
    x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.02)
    weight.main_grad = torch.zeros(fan_out, fan_in, device="cuda")
    grad = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
    linear = fp8_linear_fn(RECIPES[name])
    for _ in range(2):  # twice: the weight gradients accumulate, the amax history fills
        y = linear(x, weight)
        y.backward(grad)
    ref_x = x.detach().float().requires_grad_()
    ref_y = ref_x @ weight.detach().float().t()
    ref_y.backward(grad.float())
    ref_w = 2 * grad.float().t() @ x.detach().float()

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    assert rel(y, ref_y.detach()) < 0.06
    assert rel(x.grad, 2 * ref_x.grad) < 0.1
    assert rel(weight.main_grad, ref_w) < 0.1


def _scaled_inputs(m, n, k, a_dtype, b_dtype):
    a = (torch.randn(m, k, device="cuda") * 4).to(a_dtype)
    b = (torch.randn(n, k, device="cuda") * 4).to(b_dtype)
    return a, torch.tensor(0.37, device="cuda"), b, torch.tensor(1.9, device="cuda")


@pytest.mark.parametrize("types", [(E5M2, E4M3), (E4M3, E4M3), (E4M3, E5M2)], ids=["e5m2-e4m3", "e4m3-e4m3", "e4m3-e5m2"])
@pytest.mark.parametrize("shape", [(1024, 4096, 2048), (5632, 2048, 4096), (16, 48, 32)])
@pytest.mark.parametrize("out_offset", [0, 4], ids=["out-at-start", "out-at-16-bytes"])
def test_gemm_accumulate_equals_scaled_mm_then_add(shape, types, out_offset):
    """csrc/fp8_gemm.cu: out += (sa a) (sb b)^T equals torch._scaled_mm's fp32 product added to
    out, for out at the start of its storage and at an offset (a main_grad view in a buffer;
    the gradient buffer starts each one at a multiple of 256 bytes)."""
    torch.manual_seed(0)
    m, n, k = shape
    a, a_scale, b, b_scale = _scaled_inputs(m, n, k, *types)
    storage = torch.randn(m * n + out_offset, device="cuda")
    out = storage[out_offset:].view(m, n)
    start = out.clone()
    assert loader.fp8_gemm_accumulate_supported(out)
    loader.fp8_gemm_accumulate(a, a_scale, b, b_scale, out)
    product = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.float32)
    torch.testing.assert_close(out, start + product, rtol=1e-5, atol=1e-5 * float(product.abs().max()))
    loader.gemm_extension().fp8_gemm_accumulate(a, a_scale, b, b_scale, out, accumulate=False)
    torch.testing.assert_close(out, product, rtol=1e-5, atol=1e-5 * float(product.abs().max()))


def test_gemm_accumulate_refuses_what_it_cannot_do():
    ext = loader.gemm_extension()
    a, a_scale, b, b_scale = _scaled_inputs(64, 32, 48, E5M2, E5M2)
    out = torch.zeros(64, 32, device="cuda")
    with pytest.raises(RuntimeError, match="e5m2 by e5m2"):
        ext.fp8_gemm_accumulate(a, a_scale, b, b_scale, out)
    a, a_scale, b, b_scale = _scaled_inputs(64, 32, 48, E4M3, E4M3)
    with pytest.raises(RuntimeError, match="float32"):
        ext.fp8_gemm_accumulate(a, a_scale, b, b_scale, out.bfloat16())
    with pytest.raises(RuntimeError, match="must be \\[64, 32\\], got \\[32, 64\\]"):
        ext.fp8_gemm_accumulate(a, a_scale, b, b_scale, torch.zeros(32, 64, device="cuda"))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.fp8_gemm_accumulate(a[:, :40].contiguous(), a_scale, b[:, :40].contiguous(), b_scale, out)
    assert not loader.fp8_gemm_accumulate_supported(torch.zeros(64, 40, device="cuda"))
    assert not loader.fp8_gemm_accumulate_supported(torch.zeros(64, 32, device="cuda").t())
    # cuBLASLt has no FP8 kernel for an fp32 output aligned to less than 16 bytes.
    assert not loader.fp8_gemm_accumulate_supported(torch.zeros(64 * 32 + 1, device="cuda")[1:].view(64, 32))


def test_linear_weight_gradient_takes_the_accumulating_gemm(monkeypatch):
    """The tensor-scaled linear's weight gradient goes through the accumulating GEMM and equals
    the product-and-add path within fp32 rounding, over two micro-batches into one main_grad."""
    torch.manual_seed(2)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    calls = []
    gemm = loader.fp8_gemm_accumulate
    monkeypatch.setattr(loader, "fp8_gemm_accumulate", lambda *args: calls.append(1) or gemm(*args))
    results = []
    for use_gemm in (True, False):
        if not use_gemm:
            monkeypatch.setattr(loader, "fp8_gemm_accumulate_supported", lambda out: False)
        weight = torch.nn.Parameter(torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16) * 0.02)
        weight.main_grad = torch.zeros(768, 1024, device="cuda")
        linear = fp8_linear_fn(FP8Recipe())
        for _ in range(2):
            weight.main_grad_filled = False
            linear(x, weight).backward(grad)
            assert weight.main_grad_filled  # the buffer's hook must not add the returned placeholder too
        results.append(weight.main_grad)
    assert len(calls) == 2
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5 * float(results[1].abs().max()))

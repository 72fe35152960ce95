"""NF4 on CUDA: the dequantise kernel (csrc/nf4_dequantize.cu) equals the torch reference bit for bit, and the
NF4 linear (bf16) matches a bf16 linear on the dequantised weight, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from csrc import loader
from parallel import nf4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Ragged sizes (a partial last 64-block, a partial 256-block of scales, an odd element count)
# and a Llama-sized projection shard.
SHAPES = [(64, 64), (7, 13), (1000, 333), (4096, 4096), (11008, 512)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernel_takes_every_compute_dtype(dtype):
    holder = nf4.NF4Weight(torch.randn(64, 64, device="cuda") * 0.02)
    assert loader.nf4_dequantize_supported(holder.packed, dtype), "NF4 would fall back to the torch ops"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_dequantise_equals_torch_exactly(shape, double_quant, dtype):
    torch.manual_seed(0)
    holder = nf4.NF4Weight(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02, double_quant)
    fused = nf4.dequantize(holder, dtype)
    assert fused.shape == shape and fused.dtype == dtype
    assert torch.equal(fused, nf4.dequantize_torch(holder, dtype))


def test_kernel_dequantise_is_exact_for_scales_of_every_magnitude():
    """Blocks whose absmaxes span many binades (and an all-zero block), so the double-quantised
    scale's multiply-then-add is exercised where an FMA would round differently."""
    torch.manual_seed(1)
    magnitudes = torch.logspace(-6, 2, 300, device="cuda")
    weight = torch.randn(300, 64, device="cuda") * magnitudes[:, None]
    weight[17] = 0
    for double_quant in (False, True):
        holder = nf4.NF4Weight(weight, double_quant)
        assert torch.equal(nf4.dequantize(holder, torch.float32), nf4.dequantize_torch(holder, torch.float32))


def test_quantisation_on_gpu_equals_quantisation_on_cpu():
    torch.manual_seed(0)
    weight = torch.randn(512, 640) * 0.02
    on_cpu, on_gpu = nf4.NF4Weight(weight), nf4.NF4Weight(weight.cuda())
    assert torch.equal(on_cpu.packed, on_gpu.packed.cpu())
    torch.testing.assert_close(on_cpu.block_absmax(), on_gpu.block_absmax().cpu(), rtol=1e-6, atol=0)


def test_linear_bf16_forward_and_input_gradient_match_a_bf16_reference():
    torch.manual_seed(0)
    weight = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    holder = nf4.NF4Weight(weight)
    bias = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = nf4.NF4LinearFn(holder)(x, None, bias)
    grad = torch.randn_like(y)
    y.backward(grad)

    dense = nf4.dequantize_torch(holder, torch.bfloat16)
    ref_x, ref_b = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref_y = F.linear(ref_x, dense, ref_b)
    ref_y.backward(grad)
    # Same bf16 operands and the same cuBLAS calls: equal up to the bias-gradient reduction order.
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bias.grad.float(), ref_b.grad.float(), rtol=1e-2, atol=1e-1)


def test_linear_keeps_no_dequantised_weight_alive_between_forward_and_backward():
    holder = nf4.NF4Weight(torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = nf4.NF4LinearFn(holder)(x, None, None)
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    assert held < 8192 * 8192 * 2 // 4  # a bf16 copy of W would be 128 MiB
    y.float().sum().backward()
    assert x.grad is not None

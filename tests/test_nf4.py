"""NF4 format (code book, quantise/dequantise, packing, double quantisation, memory) and the
NF4 linear (forward, input gradient, nothing weight-sized saved, TP layers) on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from parallel import nf4
from tests.distributed import run_distributed

# As published with QLoRA (bitsandbytes' NF4 data type), index order 0..15.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
MAX_HALF_GAP = max(b - a for a, b in zip(PUBLISHED_NF4, PUBLISHED_NF4[1:])) / 2


def test_code_book_is_the_published_nf4_values():
    assert nf4.code_book().tolist() == [torch.tensor(v, dtype=torch.float32).item() for v in PUBLISHED_NF4]


def test_code_book_matches_the_normal_quantile_construction():
    # QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles (outermost at
    # p = 0.9677083), an exact zero, all divided by the largest magnitude.
    normal = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(nf4.code_book().double(), values / values.abs().max(), rtol=0, atol=2e-7)


def _code_book_weight(blocks: int, scale: float, generator) -> torch.Tensor:
    """Blocks of random code values, each block holding 1.0 somewhere so its absmax is `scale`."""
    indices = torch.randint(0, 16, (blocks, nf4.BLOCK_SIZE), generator=generator)
    indices[torch.arange(blocks), torch.randint(0, nf4.BLOCK_SIZE, (blocks,), generator=generator)] = 15
    return nf4.code_book()[indices] * scale


@pytest.mark.parametrize("scale", [1.0, 0.0173, 3.5, 1e-4])
def test_quantising_the_code_book_is_exact(scale):
    generator = torch.Generator().manual_seed(1)
    weight = _code_book_weight(12, scale, generator).view(16, 48)
    holder = nf4.NF4Weight(weight, double_quant=False)
    assert torch.equal(nf4.dequantize(holder), weight)


def _per_element_absmax(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.reshape(-1)
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % nf4.BLOCK_SIZE)]).view(-1, nf4.BLOCK_SIZE)
    return padded.abs().amax(1).repeat_interleave(nf4.BLOCK_SIZE)[:flat.numel()].view(weight.shape)


def test_round_trip_error_is_within_half_the_largest_code_gap():
    torch.manual_seed(0)
    weight = torch.randn(100, 77) * 0.02  # 7700 values: the last block is padded
    absmax = _per_element_absmax(weight)
    error = (nf4.dequantize(nf4.NF4Weight(weight, double_quant=False)) - weight).abs()
    assert (error <= MAX_HALF_GAP * absmax * (1 + 1e-6)).all()
    # And the code chosen is the nearest one: no other code value would be closer.
    distance_to_each_code = (weight / absmax).unsqueeze(-1) - nf4.code_book()
    best = distance_to_each_code.abs().amin(-1) * absmax
    assert ((error - best).abs() <= 1e-6 * absmax).all()  # up to rounding of the two computations


def test_all_zero_blocks_stay_zero():
    weight = torch.zeros(4, 64)
    weight[1, 3] = 0.5
    assert torch.equal(nf4.dequantize(nf4.NF4Weight(weight, double_quant=False)), weight)


def test_double_quantisation_moves_each_scale_by_at_most_half_a_step():
    torch.manual_seed(0)
    absmax = torch.rand(1000) * 0.1 + 0.01  # 1000 scales: 4 blocks of 256, the last one partial
    codes, step, mean = nf4.quantize_scales(absmax)
    assert codes.dtype == torch.int8 and step.numel() == 4 and mean.numel() == 1
    error = (nf4.dequantize_scales(codes, step, mean) - absmax).abs()
    per_scale_step = step.repeat_interleave(nf4.SCALE_BLOCK_SIZE)[:1000]
    assert (error <= per_scale_step / 2 * (1 + 1e-4) + 1e-9).all()
    # The step is each 256-block's largest centred scale over 127 (symmetric int8).
    centred = torch.cat([absmax - absmax.mean(), torch.zeros(24)]).view(4, 256)
    torch.testing.assert_close(step, centred.abs().amax(1) / 127)


def test_double_quantised_holder_uses_the_dequantised_scales():
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    plain, double = nf4.NF4Weight(weight, double_quant=False), nf4.NF4Weight(weight, double_quant=True)
    assert torch.equal(plain.packed, double.packed)  # the codes do not depend on the scales' storage
    scale_error = (double.block_absmax() - plain.block_absmax()).abs().max()
    assert 0 < scale_error <= double.absmax_step.max() / 2 * (1 + 1e-4)
    expected = nf4.code_book()[nf4.unpack_nibbles(double.packed).long()].view(-1, 64) * double.block_absmax()[:, None]
    assert torch.equal(nf4.dequantize(double), expected.view(64, 512))


def test_packing_is_a_bijection():
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(nf4.pack_nibbles(nf4.unpack_nibbles(every_byte)), every_byte)
    indices = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    packed = nf4.pack_nibbles(indices)
    assert packed.numel() == 500 and torch.equal(nf4.unpack_nibbles(packed), indices)
    assert nf4.pack_nibbles(torch.tensor([3, 10], dtype=torch.uint8)).item() == 3 | (10 << 4)


def _expected_bytes(numel: int, double_quant: bool) -> int:
    blocks = math.ceil(numel / nf4.BLOCK_SIZE)
    codes = blocks * nf4.BLOCK_SIZE // 2
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / nf4.SCALE_BLOCK_SIZE) + 4


@pytest.mark.parametrize("double_quant, bound", [(False, 0.5625), (True, 0.5160)])
def test_holder_memory_per_weight(double_quant, bound):
    weight = torch.randn(1024, 1024, dtype=torch.bfloat16)
    holder = nf4.NF4Weight(weight, double_quant)
    assert holder.nbytes() == _expected_bytes(weight.numel(), double_quant)
    assert holder.nbytes() / weight.numel() <= bound  # 0.5 + 4/64; 0.5 + 1/64 + 4/(64*256) + 4/n


def test_linear_forward_and_input_gradient_match_the_dequantised_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 96) * 0.05, torch.randn(48, requires_grad=True)
    holder = nf4.NF4Weight(weight)
    x = torch.randn(5, 3, 96, requires_grad=True)
    y = nf4.NF4LinearFn(holder)(x, None, bias)
    grad = torch.randn_like(y)
    y.backward(grad)

    dense = nf4.dequantize(holder, torch.float32)
    ref_x, ref_b = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref_y = F.linear(ref_x, dense, ref_b)
    ref_y.backward(grad)
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.grad, ref_b.grad, rtol=1e-6, atol=1e-6)


def test_linear_saves_nothing_weight_sized_for_backward():
    holder = nf4.NF4Weight(torch.randn(256, 128))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4.NF4LinearFn(holder)(x, None, None)
    assert all(n < 256 * 128 for n in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 256) @ nf4.dequantize(holder, torch.float32))


def test_linear_refuses_a_full_precision_weight():
    holder = nf4.NF4Weight(torch.randn(8, 64))
    with pytest.raises(ValueError, match="enable_nf4"):
        nf4.NF4LinearFn(holder)(torch.randn(2, 64), torch.randn(8, 64))


def _check_tensor_parallel_mlp():
    """Column -> row parallel MLP at TP=2 with NF4 bases == the serial MLP on the gathered
    dequantised shards; the base weights leave parameters and state_dict."""
    from parallel.grid import build_grid, init_distributed
    from parallel.layers import ColumnParallelLinear, RowParallelLinear
    from parallel.sharding import init_from_full

    init_distributed("cpu")
    group = build_grid(tp=2).tp_group
    mlp = torch.nn.Sequential(ColumnParallelLinear(64, 256, group, bias=True),
                              RowParallelLinear(256, 64, group, bias=True))
    for name, param in mlp.named_parameters():
        init_from_full(param, name, seed=0, std=0.05)
    assert nf4.enable_nf4(mlp, targets=["1"]) == 1  # by name: only the row-parallel layer
    assert mlp[0].weight is not None and mlp[1].weight is None
    assert nf4.enable_nf4(mlp) == 2  # the rest; already quantised layers are left alone
    assert sorted(n for n, _ in mlp.named_parameters()) == ["0.bias", "1.bias"]
    assert sorted(mlp.state_dict()) == ["0.bias", "1.bias"]

    torch.manual_seed(0)
    x = torch.randn(6, 2, 64, requires_grad=True)
    y = mlp[1](F.silu(mlp[0](x)))
    y.sum().backward()
    full = [layer.nf4.shard_spec.gather(nf4.dequantize(layer.nf4), group) for layer in mlp]
    column_bias = mlp[0].bias.shard_spec.gather(mlp[0].bias.detach(), group)
    ref_x = x.detach().clone().requires_grad_()
    ref_y = F.linear(F.silu(F.linear(ref_x, full[0], column_bias)), full[1], mlp[1].bias.detach())
    ref_y.sum().backward()
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    return True


def test_tensor_parallel_layers_with_nf4_bases_equal_the_serial_dequantised_mlp():
    assert run_distributed(_check_tensor_parallel_mlp, 2) == [True, True]

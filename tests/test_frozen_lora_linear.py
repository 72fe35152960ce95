"""The fused adapted linear over a frozen base (parallel/frozen_lora_linear.py) equals the same
linear built from separate ops (LoRALinearFn.composed), over a 16-bit and an NF4 base, and the
adapter takes the composed path where the fused Function does not apply."""
import pytest
import torch
from torch import nn

from parallel import main_grad_linear, nf4
from parallel.lora import ALL_BLOCKS, LoRALinearFn

IN, OUT, RANK, SCALE = 96, 160, 8, 2.0


def adapted(base: str, bias_trains=None, weight_trains=False, dropout=0.0, device="cpu", dtype=torch.float32):
    """(linear_fn, weight, bias) of one adapted linear with nonzero adapters."""
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    module = nn.Module()
    module.lora_A = nn.Parameter(torch.randn(RANK, IN, **factory) * 0.1)
    module.lora_B = nn.Parameter(torch.randn(OUT, RANK, **factory) * 0.1)
    full = torch.randn(OUT, IN, **factory) * 0.05
    if base == "nf4":
        module.nf4, weight = nf4.NF4Weight(full), None
        base_fn = nf4.NF4LinearFn(module.nf4)
    else:
        weight, base_fn = nn.Parameter(full, requires_grad=weight_trains), main_grad_linear.linear
    bias = None if bias_trains is None else nn.Parameter(torch.randn(OUT, **factory) * 0.1, requires_grad=bias_trains)
    return LoRALinearFn(module, base_fn, SCALE, dropout, ALL_BLOCKS, rng=None), weight, bias


def run(path, x, weight, bias, grad_out):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = path(x, weight, bias)
    y.backward(grad_out)
    return y, x.grad


@pytest.mark.parametrize("base", ["16-bit", "nf4"])
@pytest.mark.parametrize("bias_trains", [None, False])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_fused_equals_composed(base, bias_trains, x_needs_grad):
    fn, weight, bias = adapted(base, bias_trains)
    x = torch.randn(5, 3, IN).requires_grad_(x_needs_grad)
    grad_out = torch.randn(5, 3, OUT)
    module = fn.module

    y, x_grad = run(fn, x, weight, bias, grad_out)
    assert type(y.grad_fn).__name__ == "_FrozenBaseLoRALinearBackward"
    fused_grads = [module.lora_A.grad.clone(), module.lora_B.grad.clone()]
    module.zero_grad(set_to_none=True)
    ref_y, ref_x_grad = run(fn.composed, x, weight, bias, grad_out)
    assert type(ref_y.grad_fn).__name__ != "_FrozenBaseLoRALinearBackward"

    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    if x_needs_grad:
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-6)
    else:
        assert x_grad is None
    torch.testing.assert_close(fused_grads[0], module.lora_A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grads[1], module.lora_B.grad, rtol=1e-5, atol=1e-6)
    assert weight is None or weight.grad is None


def test_fused_nf4_saves_nothing_weight_sized():
    fn, weight, bias = adapted("nf4")
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(torch.randn(4, IN, requires_grad=True), weight, bias)
    assert type(y.grad_fn).__name__ == "_FrozenBaseLoRALinearBackward"
    assert saved and max(saved) < OUT * IN


@pytest.mark.parametrize("case", [dict(weight_trains=True), dict(bias_trains=True), dict(dropout=0.1)])
def test_composed_path_where_the_fused_one_does_not_apply(case):
    fn, weight, bias = adapted("16-bit", **case)
    y = fn(torch.randn(4, IN), weight, bias)
    assert type(y.grad_fn).__name__ != "_FrozenBaseLoRALinearBackward"

"""The FP8 linear equals a matmul of its quantised operands, and stays close to full precision."""
import torch

from parallel.fp8 import E4M3, E5M2, fp8_linear_fn, quantize


def test_quantize_round_trip_is_within_fp8_precision():
    x = torch.randn(256, 64) * 3
    for dtype, rel in ((E4M3, 0.07), (E5M2, 0.13)):
        q, inv = quantize(x, dtype)
        back = q.float() * inv
        assert ((back - x).abs() <= rel * x.abs() + 1e-3).all()
        assert back.abs().max() <= x.abs().max() * 1.0001


def test_forward_equals_dequantised_matmul_and_backward_is_close():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64, requires_grad=True)
    w = (torch.randn(32, 64) * 0.05).requires_grad_(True)
    b = torch.randn(32, requires_grad=True)
    y = fp8_linear_fn()(x, w, b)
    x8, xi = quantize(x.detach().reshape(-1, 64), E4M3)
    w8, wi = quantize(w.detach(), E4M3)
    expected = (x8.float() * xi) @ (w8.float() * wi).t() + b.detach()
    torch.testing.assert_close(y.detach().reshape(-1, 32), expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(y)
    y.backward(grad)
    ref_x, ref_w, ref_b = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(ref_x, ref_w, ref_b).backward(grad)
    for got, ref in ((x.grad, ref_x.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)):
        assert ((got - ref).norm() / ref.norm()) < 0.1
    torch.testing.assert_close(b.grad, ref_b.grad)


def test_odd_shapes_fall_back_to_full_precision():
    x, w = torch.randn(3, 10), torch.randn(6, 10)
    torch.testing.assert_close(fp8_linear_fn()(x, w), x @ w.t())


def test_amax_history_uses_the_largest_recent_amax():
    linear = fp8_linear_fn(history=4)
    w = torch.randn(16, 16)
    linear(torch.full((16, 16), 8.0), w)
    y_small = linear(torch.full((16, 16), 1.0), w)  # scale still set by amax 8 from history
    assert torch.isfinite(y_small).all()


def test_weight_gradient_goes_into_main_grad_as_fp32():
    """With a gradient buffer the FP8 weight gradient is added to main_grad in fp32 (no bf16
    .grad to add later), across accumulated backward passes, and flagged for the buffer hook."""
    torch.manual_seed(1)
    x = torch.randn(64, 32)
    w_plain = (torch.randn(16, 32) * 0.05).requires_grad_(True)
    w_fused = w_plain.detach().clone().requires_grad_(True)
    w_fused.main_grad = torch.zeros(16, 32)
    grads = [torch.randn(64, 16) for _ in range(2)]
    linear = fp8_linear_fn()
    for grad in grads:
        linear(x, w_plain).backward(grad)
        linear(x, w_fused).backward(grad)
    assert w_fused.main_grad_filled
    torch.testing.assert_close(w_fused.main_grad, w_plain.grad, rtol=1e-5, atol=1e-6)

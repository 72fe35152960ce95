"""The FP8 linear equals a matmul of its quantised operands, and stays close to full precision."""
import pytest
import torch

from parallel.fp8 import E4M3, E5M2, FP8Recipe, fp8_linear_fn, quantize


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


@pytest.mark.parametrize("x_shape,w_shape", [((3, 10), (6, 10)), ((3, 16), (32, 16))],
                         ids=["odd-features", "token-count-not-a-multiple-of-16"])
def test_odd_shapes_fall_back_to_full_precision(x_shape, w_shape):
    x, w = torch.randn(*x_shape), torch.randn(*w_shape)
    torch.testing.assert_close(fp8_linear_fn()(x, w), x @ w.t())


def test_amax_history_uses_the_largest_recent_amax():
    linear = fp8_linear_fn(FP8Recipe(amax_history=4))
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


def test_row_scaling_quantises_each_layout_by_its_own_rows():
    """Row scales: a row of huge values costs precision in its own row only, and the transposed
    layout is scaled by the original's columns."""
    torch.manual_seed(2)
    x = torch.randn(32, 48)
    x[3] *= 1000.0
    from parallel.fp8 import quantize_both_layouts, quantize_rows
    x8, inv, x8_t, inv_t = quantize_both_layouts(x, E4M3, rowwise=True)
    assert inv.shape == (32, 1) and inv_t.shape == (48, 1) and x8_t.is_contiguous()
    back = x8.float() * inv
    others = torch.ones(32, dtype=torch.bool)
    others[3] = False
    assert ((back - x).abs()[others] <= 0.07 * x.abs()[others] + 1e-6).all()  # untouched by row 3's outlier
    by_columns, column_inv = quantize_rows(x.t().contiguous(), E4M3)
    assert torch.equal(x8_t.view(torch.uint8), by_columns.view(torch.uint8)) and torch.equal(inv_t, column_inv)


def _linear_errors(recipe):
    """(output, input-gradient, weight-gradient) relative errors of the FP8 linear against fp32."""
    torch.manual_seed(3)
    x = torch.randn(64, 96, requires_grad=True)
    w = (torch.randn(80, 96) * 0.05).requires_grad_(True)
    grad = torch.randn(64, 80)
    y = fp8_linear_fn(recipe)(x, w)
    y.backward(grad)
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = ref_x @ ref_w.t()
    ref.backward(grad)
    pairs = ((y, ref), (x.grad, ref_x.grad), (w.grad, ref_w.grad))
    return [float((a.detach() - b.detach()).norm() / b.detach().norm()) for a, b in pairs]


def test_every_recipe_stays_close_to_full_precision():
    for recipe in (FP8Recipe(), FP8Recipe(grad_dtype=E4M3), FP8Recipe(rowwise=True),
                   FP8Recipe(grad_dtype=E4M3, rowwise=True), FP8Recipe.from_names("e4m3", "row")):
        errors = _linear_errors(recipe)
        assert max(errors) < 0.1, (recipe, errors)
    # e4m3 gradients carry more mantissa than e5m2: closer input and weight gradients.
    hybrid, e4m3 = _linear_errors(FP8Recipe()), _linear_errors(FP8Recipe(grad_dtype=E4M3))
    assert e4m3[1] < hybrid[1] and e4m3[2] < hybrid[2]


def test_row_scaled_forward_equals_the_row_dequantised_matmul():
    torch.manual_seed(4)
    x, w = torch.randn(32, 64), torch.randn(48, 64) * 0.1
    from parallel.fp8 import quantize_rows
    x8, xi = quantize_rows(x, E4M3)
    w8, wi = quantize_rows(w, E4M3)
    expected = (x8.float() * xi) @ (w8.float() * wi).t()
    got = fp8_linear_fn(FP8Recipe(rowwise=True))(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_amax_history_updates_one_tensor_in_place():
    """A CUDA graph replays the same memory: the history must live in one tensor that each
    observation rewrites, not in a new tensor per step."""
    from parallel.fp8 import AmaxHistory
    history = AmaxHistory(3)
    first = history.observe("x", torch.full((4,), 2.0))
    buffer = history.history["x"]
    values = [history.observe("x", torch.full((4,), v)) for v in (5.0, 1.0, 1.0, 1.0)]
    assert history.history["x"] is buffer
    assert [float(v) for v in [first, *values]] == [2.0, 5.0, 5.0, 5.0, 1.0]


def test_saved_amax_histories_go_back_into_their_linears():
    """What a checkpoint stores (amax_histories) loads into the same-named linears of a fresh
    model, into the live tensor where one exists; a wrong length or an unknown name is refused."""
    from parallel.fp8_state import amax_histories, amax_history_length, load_amax_histories

    class Layer(torch.nn.Linear):  # a linear that computes through its linear_fn, as the TP linears do
        def forward(self, x):
            return self.linear_fn(x, self.weight)

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(Layer(32, 32, bias=False), Layer(32, 32, bias=False))
        for layer in net:
            layer.linear_fn = fp8_linear_fn(FP8Recipe(amax_history=3))
        return net

    trained, fresh = model(), model()
    for scale in (1.0, 4.0):
        trained(torch.randn(16, 32) * scale).sum().backward()
    saved = {name: past.clone() for name, past in amax_histories(trained).items()}
    assert sorted(saved) == [f"{layer}.{key}" for layer in "01" for key in "gwx"] and amax_history_length(fresh) == 3
    fresh(torch.randn(16, 32))  # a live x history in each layer, to be overwritten in place
    live = amax_histories(fresh)["0.x"]
    assert load_amax_histories(fresh, saved) == 6
    assert amax_histories(fresh)["0.x"] is live
    for name, past in amax_histories(fresh).items():
        assert torch.equal(past, saved[name])
    with pytest.raises(ValueError, match="holds 2 amaxes; this run keeps 3"):
        load_amax_histories(fresh, {"0.x": torch.zeros(2)})
    with pytest.raises(ValueError, match="name no FP8 linear"):
        load_amax_histories(fresh, {"2.x": torch.zeros(3)})

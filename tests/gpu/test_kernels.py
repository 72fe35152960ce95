"""Fused CUDA kernels vs their torch references (forward and backward), on a GPU.

Relative error is ||fused - reference|| / ||reference|| over the whole tensor, both computed
from the same inputs in the same dtype. Bounds: 1e-2 for bf16/fp16, 1e-4 for fp32 (the
brief asks for "far under 1e-3").
"""
import pytest
import torch

from csrc import fused_ops, loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rows shape, hidden): warp-per-row (1, 2, 4 vectors per lane, ragged), block-per-row
# (ragged threads, non-power-of-two 5120, the 2048 x 4096 case, the 16384 maximum).
NORM_SHAPES = [((33,), 256), ((3, 7), 1024), ((5,), 520), ((9,), 1032), ((64,), 5120),
               ((2048,), 4096), ((16,), 16384), ((2, 3), 8)]
# (b, h, sq, sk)
SOFTMAX_SHAPES = [(2, 4, 128, 128), (2, 3, 33, 520), (1, 2, 64, 256), (1, 2, 32, 8192), (4, 16, 64, 2048),
                  (1, 1, 8, 16384)]


@pytest.fixture(scope="module")
def ext():
    module = loader.build_kernels()  # a build failure fails the tests instead of skipping them
    assert module.max_norm_hidden == fused_ops.MAX_NORM_HIDDEN
    assert module.max_softmax_keys == fused_ops.MAX_SOFTMAX_KEYS
    return module


def bound(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-2


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close_rel(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < bound(dtype), f"{what}: relative error {err:.3e} >= {bound(dtype):.0e}"


def forward_backward(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


# ----------------------------------------------------------------------------- norms


def norm_inputs(rows_shape, hidden, dtype, weight_dtype, with_bias, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*rows_shape, hidden, device="cuda", generator=gen).mul_(2).add_(0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, device="cuda", generator=gen)).to(weight_dtype)
    b = (0.2 * torch.randn(hidden, device="cuda", generator=gen)).to(weight_dtype) if with_bias else None
    dy = torch.randn(*rows_shape, hidden, device="cuda", generator=gen).to(dtype)
    return x, w, b, dy


NORM_KINDS = {
    "rms": (lambda x, w, b: fused_ops.rms_norm(x, w, 1e-6), lambda x, w, b: loader.rms_norm_reference(x, w, 1e-6)),
    "layer_bias": (lambda x, w, b: fused_ops.layer_norm(x, w, b, 1e-5),
                   lambda x, w, b: loader.layer_norm_reference(x, w, b, 1e-5)),
}


@pytest.mark.parametrize("rows_shape,hidden", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True])
@pytest.mark.parametrize("kind", ["rms", "layer_bias", "layer_nobias"])
def test_norm_matches_reference(ext, rows_shape, hidden, dtype, fp32_weight, kind):
    if fp32_weight and dtype == torch.float32:
        pytest.skip("same as the fp32 weight case")
    weight_dtype = torch.float32 if fp32_weight else dtype
    with_bias = kind == "layer_bias"
    fused_fn, ref_fn = NORM_KINDS["rms" if kind == "rms" else "layer_bias"]
    x, w, b, dy = norm_inputs(rows_shape, hidden, dtype, weight_dtype, with_bias)
    assert fused_ops.norm_supported(x, w, b)
    y, grads = forward_backward(fused_fn, (x, w, b), dy)
    y_ref, grads_ref = forward_backward(ref_fn, (x, w, b), dy)
    assert_close_rel(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        if want is not None:
            assert_close_rel(got, want, dtype, name)


@pytest.mark.parametrize("rows_shape,hidden", [((33,), 256), ((2048,), 4096), ((16,), 16384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["rms", "layer_bias"])
def test_norm_with_frozen_weights_gives_dx_only(ext, rows_shape, hidden, dtype, kind):
    """Frozen norm weights (LoRA, QLoRA) take the kernels that compute dx alone."""
    fused_fn, ref_fn = NORM_KINDS[kind]
    x, w, b, dy = norm_inputs(rows_shape, hidden, dtype, dtype, kind == "layer_bias")
    leaf = x.detach().clone().requires_grad_(True)
    fused_fn(leaf, w, b).backward(dy)
    ref_leaf = x.detach().clone().requires_grad_(True)
    ref_fn(ref_leaf, w, b).backward(dy)
    assert_close_rel(leaf.grad, ref_leaf.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_backward_is_deterministic(ext, dtype):
    x, w, b, dy = norm_inputs((4096,), 4096, dtype, dtype, True)
    _, first = forward_backward(lambda x, w, b: fused_ops.layer_norm(x, w, b, 1e-5), (x, w, b), dy)
    _, second = forward_backward(lambda x, w, b: fused_ops.layer_norm(x, w, b, 1e-5), (x, w, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("blocks", [1, 7, 100000])
def test_norm_backward_any_partial_block_count(ext, blocks):
    """The partial-sum grid size (a tuning knob) changes only the summation order."""
    x, w, b, dy = norm_inputs((999,), 2048, torch.float32, torch.float32, True)
    y, mean, rstd = ext.norm_forward(x, w, b, 1e-5, False)
    dx, dw, db = ext.norm_backward(dy, x, w, mean, rstd, True, False, True, blocks=blocks)
    _, (dx_ref, dw_ref, db_ref) = forward_backward(lambda x, w, b: loader.layer_norm_reference(x, w, b, 1e-5),
                                                   (x, w, b), dy)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert_close_rel(got, want, torch.float32, f"blocks={blocks}")


def test_back_to_back_backwards_wait_for_their_partial_sums(ext):
    """On Hopper the column-sum launch overlaps the end of the kernel that writes the partial
    sums, and must wait for them: backwards queued one after another with no synchronisation
    each match the reference."""
    queued = []
    for seed in range(8):
        x, w, b, dy = norm_inputs((2048,), 4096, torch.bfloat16, torch.bfloat16, True, seed=seed)
        _, mean, rstd = ext.norm_forward(x, w, b, 1e-5, False)
        queued.append(((x, w, b), dy, ext.norm_backward(dy, x, w, mean, rstd, True, False, True)))
    for inputs, dy, (dx, dw, db) in queued:
        _, (dx_ref, dw_ref, db_ref) = forward_backward(lambda x, w, b: loader.layer_norm_reference(x, w, b, 1e-5),
                                                       inputs, dy)
        for name, got, want in (("dx", dx, dx_ref), ("dweight", dw, dw_ref), ("dbias", db, db_ref)):
            assert_close_rel(got, want, torch.bfloat16, name)


@pytest.mark.parametrize("rows_shape,hidden", [((33,), 256), ((3, 7), 1024), ((2048,), 4096), ((16,), 16384)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "layer_bias"])
@pytest.mark.parametrize("frozen", [False, True])
def test_norm_with_residual_adds_the_stream_gradient(ext, rows_shape, hidden, dtype, kind, frozen):
    """The residual stream's gradient, added into dx by the backward kernel, against the
    reference norm's gradients plus that gradient (frozen weights: the dx-only kernels)."""
    x, w, b, dy = norm_inputs(rows_shape, hidden, dtype, dtype, kind == "layer_bias")
    d_stream = torch.randn_like(dy)
    rms = kind == "rms"
    _, ref_fn = NORM_KINDS[kind]
    params = [t.clone().requires_grad_(not frozen) if t is not None else None for t in (w, b)]
    leaf = x.detach().clone().requires_grad_(True)
    y, stream = fused_ops.norm_with_residual(leaf, *params, 1e-6 if rms else 1e-5, rms)
    torch.autograd.backward([y, stream], [dy, d_stream])
    ref_params = [t.clone().requires_grad_(not frozen) if t is not None else None for t in (w, b)]
    ref_leaf = x.detach().clone().requires_grad_(True)
    ref_fn(ref_leaf, *ref_params).backward(dy)
    assert_close_rel(leaf.grad, (ref_leaf.grad.float() + d_stream.float()).to(dtype), dtype, "dx")
    for got, want in zip(params, ref_params):
        if want is not None and not frozen:
            assert_close_rel(got.grad, want.grad, dtype, "weight grads")


def test_dispatch_uses_fused_path_and_handles_odd_inputs(ext):
    x, w, b, _ = norm_inputs((8, 16), 2048, torch.bfloat16, torch.bfloat16, True)
    assert torch.equal(loader.rms_norm(x, w, 1e-6), fused_ops.rms_norm(x, w, 1e-6))
    assert torch.equal(loader.layer_norm(x, w, b, 1e-5), fused_ops.layer_norm(x, w, b, 1e-5))
    # Non-contiguous input, an fp64 weight (cast to fp32), a hidden size the kernels skip.
    xt = x.transpose(0, 1)
    torch.testing.assert_close(loader.rms_norm(xt, w, 1e-6), loader.rms_norm_reference(xt, w, 1e-6), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(loader.rms_norm(x, w.double(), 1e-6), loader.rms_norm_reference(x, w.double(), 1e-6),
                               rtol=1e-2, atol=2e-2)
    odd = torch.randn(4, 100, device="cuda")
    assert torch.equal(loader.rms_norm(odd, torch.ones(100, device="cuda"), 1e-6),
                       loader.rms_norm_reference(odd, torch.ones(100, device="cuda"), 1e-6))


def test_norm_under_torch_compile(ext):
    x, w, b, dy = norm_inputs((64,), 4096, torch.bfloat16, torch.float32, True)

    def layer(x, w, b):
        return loader.layer_norm(x, w, b, 1e-5) * 2 + loader.rms_norm(x, w, 1e-6)

    compiled = torch.compile(layer, fullgraph=True)
    y, grads = forward_backward(compiled, (x, w, b), dy)
    y_eager, grads_eager = forward_backward(layer, (x, w, b), dy)
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- softmax


def softmax_inputs(shape, dtype, mask_kind, seed=0):
    b, h, sq, sk = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = (4 * torch.randn(shape, device="cuda", generator=gen)).to(dtype)
    dy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    if mask_kind == "padding":
        mask = torch.rand(b, 1, 1, sk, device="cuda", generator=gen) > 0.7
    elif mask_kind == "arbitrary":
        mask = torch.rand(b, h, sq, sk, device="cuda", generator=gen) > 0.5
    elif mask_kind == "rows":  # [sq, sk], some rows fully masked
        mask = torch.rand(sq, sk, device="cuda", generator=gen) > 0.5
        mask[::5] = True
    else:
        mask = None
    return scores, mask, dy


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "arbitrary", "rows"])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_reference(ext, shape, dtype, mask_kind, causal):
    scores, mask, dy = softmax_inputs(shape, dtype, mask_kind)
    scale = shape[-1] ** -0.5
    assert fused_ops.softmax_supported(scores, mask)
    y, (dx,) = forward_backward(lambda s: fused_ops.scaled_masked_softmax(s, mask, scale, causal), (scores,), dy)
    y_ref, (dx_ref,) = forward_backward(lambda s: loader.scaled_masked_softmax_reference(s, mask, scale, causal),
                                        (scores,), dy)
    assert_close_rel(y, y_ref, dtype, "y")
    assert_close_rel(dx, dx_ref, dtype, "dscores")
    hidden = torch.zeros(shape, dtype=torch.bool, device="cuda")
    if mask is not None:
        hidden |= mask
    if causal:
        hidden |= loader.causal_mask(shape[2], shape[3], "cuda")
    assert (y[hidden] == 0).all() and (dx[hidden] == 0).all(), "masked entries must be exactly zero"


def test_softmax_causal_with_more_queries_than_keys(ext):
    """Queries before the first key (sq > sk, bottom-right causal) see nothing: zero rows."""
    scores, _, dy = softmax_inputs((1, 2, 64, 32), torch.float32, "none")
    y = fused_ops.scaled_masked_softmax(scores, None, 1.0, True)
    torch.testing.assert_close(y, loader.scaled_masked_softmax_reference(scores, None, 1.0, True))
    assert (y[:, :, :32] == 0).all()


def test_softmax_dispatch_and_compile(ext):
    scores, mask, dy = softmax_inputs((2, 4, 128, 256), torch.bfloat16, "padding")
    assert torch.equal(loader.scaled_masked_softmax(scores, mask, 0.1, True),
                       fused_ops.scaled_masked_softmax(scores, mask, 0.1, True))
    compiled = torch.compile(lambda s: loader.scaled_masked_softmax(s, mask, 0.1, True) * 3, fullgraph=True)
    y, (dx,) = forward_backward(compiled, (scores,), dy)
    y_eager, (dx_eager,) = forward_backward(lambda s: loader.scaled_masked_softmax(s, mask, 0.1, True) * 3,
                                            (scores,), dy)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(dx, dx_eager)

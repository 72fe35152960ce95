"""CPU checks of the fused-op layer: dispatch fallback, the torch references, and the
autograd wiring of the custom ops (run here against a plain-torch emulation of the CUDA
extension's contract, so the backward formulas the kernels implement are checked too)."""
import pytest
import torch
import torch.nn.functional as F

from csrc import fused_ops, loader


def hand_rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def hand_softmax(scores, hidden, scale):
    """Softmax over unmasked keys written out; rows with no visible key give zeros."""
    x = scores * scale
    x = torch.where(hidden, torch.full_like(x, -1e30), x)
    e = torch.exp(x - x.amax(-1, keepdim=True)) * (~hidden)
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_falls_back_on_cpu():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 64), torch.randn(64), torch.randn(64)
    assert torch.equal(loader.rms_norm(x, w, 1e-6), loader.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(loader.layer_norm(x, w, b, 1e-5), loader.layer_norm_reference(x, w, b, 1e-5))
    s, m = torch.randn(2, 3, 4, 16), torch.rand(2, 1, 1, 16) > 0.5
    assert torch.equal(loader.scaled_masked_softmax(s, m, 0.3, True),
                       loader.scaled_masked_softmax_reference(s, m, 0.3, True))
    if not torch.cuda.is_available():
        assert loader.kernels() is None and not loader.fused_kernels_available()


def test_disable_env_forces_reference(monkeypatch):
    monkeypatch.setenv(loader.DISABLE_ENV, "1")
    assert loader.kernels_disabled() and loader.kernels() is None
    monkeypatch.setenv(loader.DISABLE_ENV, "0")
    assert not loader.kernels_disabled()


def test_cache_dir_and_arch_flags(monkeypatch, tmp_path):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    assert loader.kernel_cache_dir().parent == tmp_path
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX 9.0a")
    flags = loader.cuda_arch_flags()
    for arch in ("80", "90", "90a"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert "-gencode=arch=compute_80,code=compute_80" not in flags


def test_cublaslt_link_flags(monkeypatch, tmp_path):
    """The GEMM extension links the toolkit's cuBLASLt, else the one pip put beside torch."""
    from torch.utils import cpp_extension

    toolkit, site_dir = tmp_path / "cuda", tmp_path / "site"
    (toolkit / "lib64").mkdir(parents=True)
    (site_dir / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (site_dir / "nvidia" / "cu12" / "lib").mkdir(parents=True)
    (site_dir / "nvidia" / "cu12" / "lib" / "libcublasLt.so.12").touch()  # another CUDA: not taken
    (site_dir / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13").touch()
    monkeypatch.setattr(loader.torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    monkeypatch.setattr(loader.sys, "path", [str(site_dir)])
    pip_lib = site_dir / "nvidia" / "cu13" / "lib"
    assert loader._cublaslt_link_flags() == [f"-L{pip_lib}", "-l:libcublasLt.so.13", f"-Wl,-rpath,{pip_lib}"]
    (toolkit / "lib64" / "libcublasLt.so").touch()
    assert loader._cublaslt_link_flags() == ["-lcublasLt"]


def test_fp8_gemm_accumulate_takes_no_cpu_tensor():
    assert not loader.fp8_gemm_accumulate_supported(torch.zeros(32, 32))
    if not torch.cuda.is_available():
        assert loader.gemm_extension() is None


def test_support_checks():
    x = torch.randn(4, 4096, dtype=torch.bfloat16)
    w = torch.randn(4096)
    assert fused_ops.norm_supported(x, w, None)
    assert not fused_ops.norm_supported(torch.randn(4, 100), torch.randn(100), None)  # not a multiple of 8
    assert not fused_ops.norm_supported(torch.randn(2, 32768), torch.randn(32768), None)  # too long
    assert not fused_ops.norm_supported(x.double(), w, None)
    s = torch.randn(2, 4, 16, 64)
    assert fused_ops.softmax_supported(s, None)
    assert fused_ops.softmax_supported(s, torch.ones(2, 1, 1, 64, dtype=torch.bool))
    assert not fused_ops.softmax_supported(s, torch.ones(2, 1, 1, 64))  # not bool
    assert not fused_ops.softmax_supported(s, torch.ones(3, 1, 1, 64, dtype=torch.bool))
    assert not fused_ops.softmax_supported(torch.randn(2, 4, 16, 60), None)


def test_kernel_mask_views_without_copy():
    shape = (2, 4, 16, 64)
    padding = torch.rand(2, 1, 1, 64) > 0.5
    view = fused_ops._kernel_mask(padding, shape)
    assert view.shape == shape and view.data_ptr() == padding.data_ptr() and view.stride()[:3] == (64, 0, 0)
    transposed = (torch.rand(64, 16) > 0.5).t()  # [16, 64], not contiguous along keys
    fixed = fused_ops._kernel_mask(transposed, shape)
    assert fixed.stride(3) == 1 and torch.equal(fixed, transposed.expand(shape))


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_reference(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(6, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    y = loader.rms_norm_reference(x, w, 1e-6)
    assert y.dtype == dtype
    expected = hand_rms_norm(x.double(), w.double(), 1e-6)
    torch.testing.assert_close(y.double(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_reference(dtype, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(6, 96, dtype=dtype) * 3 + 1, torch.randn(96, dtype=dtype)
    b = torch.randn(96, dtype=dtype) if with_bias else None
    y = loader.layer_norm_reference(x, w, b, 1e-5)
    assert y.dtype == dtype
    expected = F.layer_norm(x.double(), (96,), w.double(), None if b is None else b.double(), 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_norm_statistics_are_fp32_for_half_inputs():
    # A bf16 input of large magnitude: squared values overflow nothing in fp32; the result
    # must equal normalising the fp32 copy and rounding once.
    x = (torch.randn(4, 64) * 300).bfloat16()
    w = torch.ones(64, dtype=torch.bfloat16)
    expected = hand_rms_norm(x.float(), w.float(), 1e-6).bfloat16()
    assert torch.equal(loader.rms_norm_reference(x, w, 1e-6), expected)


def _masks(b, h, sq, sk):
    torch.manual_seed(1)
    return {
        "none": None,
        "padding": torch.rand(b, 1, 1, sk) > 0.6,
        "arbitrary": torch.rand(b, h, sq, sk) > 0.5,
    }


@pytest.mark.parametrize("mask_kind", ["none", "padding", "arbitrary"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(8, 8), (4, 16), (16, 8)])
def test_softmax_reference(mask_kind, causal, sq, sk):
    torch.manual_seed(0)
    b, h = 2, 3
    scores = torch.randn(b, h, sq, sk, dtype=torch.float64) * 4
    mask = _masks(b, h, sq, sk)[mask_kind]
    hidden = torch.zeros(b, h, sq, sk, dtype=torch.bool)
    if mask is not None:
        hidden |= mask
    if causal:  # key j hidden from query i when j > i + (sk - sq)
        hidden |= torch.ones(sq, sk, dtype=torch.bool).triu(1 + sk - sq)
    y = loader.scaled_masked_softmax_reference(scores, mask, 0.7, causal)
    torch.testing.assert_close(y, hand_softmax(scores, hidden, 0.7), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(y).all()


def test_softmax_reference_fully_masked_rows_are_zero_with_finite_grad():
    scores = torch.randn(1, 2, 4, 8, requires_grad=True)
    mask = torch.zeros(1, 2, 4, 8, dtype=torch.bool)
    mask[0, 1, 2] = True
    y = loader.scaled_masked_softmax_reference(scores, mask, 1.0, False)
    assert torch.equal(y[0, 1, 2], torch.zeros(8))
    torch.testing.assert_close(y.sum(-1)[0, 0], torch.ones(4))
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.equal(scores.grad[0, 1, 2], torch.zeros(8))


def test_softmax_reference_matches_torch_causal():
    scores = torch.randn(2, 2, 8, 8)
    expected = torch.softmax((scores * 0.5).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf")), -1)
    torch.testing.assert_close(loader.scaled_masked_softmax_reference(scores, None, 0.5, True), expected)


def test_reference_gradcheck():
    torch.manual_seed(0)
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(3, 8, **opts), torch.randn(8, **opts), torch.randn(8, **opts)
    assert torch.autograd.gradcheck(lambda x, w: loader.rms_norm_reference(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: loader.layer_norm_reference(x, w, b, 1e-5), (x, w, b))
    scores = torch.randn(2, 2, 4, 8, **opts)
    mask = torch.rand(2, 1, 4, 8) > 0.6
    assert torch.autograd.gradcheck(lambda s: loader.scaled_masked_softmax_reference(s, mask, 0.5, True), (scores,))


# ----------------------------------------------------------------------------- op wiring
# The fused ops call the compiled extension through fused_ops._ext(). Here _ext() returns a
# plain-torch emulation of the extension's contract: norm_forward returns (y, mean, rstd)
# with fp32 per-row statistics, and the backward uses the closed forms the kernels implement.
# Running the ops through it on CPU checks the autograd wiring (eager autograd.Function and
# the custom ops used under torch.compile) and the backward formulas.


class EmulatedExtension:
    @staticmethod
    def norm_forward(x, weight, bias, eps, rms):
        hidden = x.shape[-1]
        xf = x.reshape(-1, hidden).double()
        mean = torch.zeros(xf.shape[0], dtype=torch.float64) if rms else xf.mean(-1)
        rstd = torch.rsqrt((xf - mean[:, None]).pow(2).mean(-1) + eps)
        y = (xf - mean[:, None]) * rstd[:, None] * weight.double()
        if bias is not None:
            y = y + bias.double()
        mean_out = torch.empty(0, dtype=torch.float32) if rms else mean.float()
        return y.to(x.dtype).reshape(x.shape), mean_out, rstd.float()

    @staticmethod
    def norm_backward(dy, x, weight, mean, rstd, has_bias, rms, need_weight_grad, dresidual=None, blocks=0):
        hidden = x.shape[-1]
        xf, g0 = x.reshape(-1, hidden).double(), dy.reshape(-1, hidden).double()
        rs = rstd.double()[:, None]
        xhat = (xf - (0.0 if rms else mean.double()[:, None])) * rs
        g = g0 * weight.double()
        mean_g = 0.0 if rms else g.mean(-1, keepdim=True)
        dx = rs * (g - mean_g - xhat * (g * xhat).mean(-1, keepdim=True))
        if dresidual is not None:
            dx = dx + dresidual.reshape(-1, hidden).double()
        dw = (g0 * xhat).sum(0).to(weight.dtype) if need_weight_grad else torch.empty(0, dtype=weight.dtype)
        db = g0.sum(0).to(weight.dtype) if need_weight_grad and has_bias else torch.empty(0, dtype=weight.dtype)
        return dx.to(x.dtype).reshape(x.shape), dw, db

    @staticmethod
    def softmax_forward(scores, mask, scale, causal):
        assert mask is None or (mask.shape == scores.shape and mask.stride(3) == 1)
        return loader.scaled_masked_softmax_reference(scores, mask, scale, causal)

    @staticmethod
    def softmax_backward(dy, y, scale, causal):
        yf, gf = y.double(), dy.double()
        return (scale * yf * (gf - (gf * yf).sum(-1, keepdim=True))).to(y.dtype)


    # SwiGLU and QKV split + RoPE: the closed forms of csrc/swiglu.cu and csrc/qkv_rope.cu.
    @staticmethod
    def swiglu_forward(h):
        gate, up = h.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up

    @staticmethod
    def swiglu_backward(h, dy):
        gate, up = h.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([dy * up * s * (1 + gate * (1 - s)), dy * gate * s], dim=-1)

    @staticmethod
    def qkv_rope_forward(qkv, cos, sin, heads, kv_heads):
        s, b, width = qkv.shape
        d = width // (heads + 2 * kv_heads)
        x = qkv.reshape(s, b, heads + 2 * kv_heads, d)
        c, n = (_rope_table_sbnd(t.to(qkv.dtype)) for t in (cos, sin))
        lo, hi = x[..., : d // 2], x[..., d // 2:]
        half = d // 2
        rotated = torch.cat([lo * c[..., :half] - hi * n[..., :half], hi * c[..., half:] + lo * n[..., half:]], -1)
        rotated = torch.cat([rotated[:, :, : heads + kv_heads], x[:, :, heads + kv_heads:]], dim=2)
        return [t.contiguous() for t in rotated.split((heads, kv_heads, kv_heads), dim=2)]

    @staticmethod
    def qkv_rope_backward(dq, dk, dv, cos, sin):
        s, b, _, d = dq.shape
        half = d // 2
        g = torch.cat([dq, dk], dim=2)
        c, n = (_rope_table_sbnd(t.to(dq.dtype)) for t in (cos, sin))
        lo, hi = g[..., :half], g[..., half:]
        dx = torch.cat([lo * c[..., :half] + hi * n[..., half:], hi * c[..., half:] - lo * n[..., :half]], -1)
        return torch.cat([dx, dv], dim=2).reshape(s, b, -1)


def _rope_table_sbnd(table):
    """cos or sin, [s, d] or per sample [b, s, d], broadcast over [s, b, n, d] (as the kernel reads it)."""
    return table.permute(1, 0, 2)[:, :, None, :] if table.dim() == 3 else table[:, None, None, :]


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(fused_ops, "_ext", lambda: EmulatedExtension)
    return fused_ops


def _norm_op(x, w, b, eps, rms):
    """The custom-op door (what torch.compile graphs call)."""
    return fused_ops.norm_fwd(x, w, b, eps, rms)[0]


def test_norm_gradcheck_eager_and_op(emulated):
    torch.manual_seed(0)
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(2, 3, 16, **opts), torch.randn(16, **opts), torch.randn(16, **opts)
    # fp32 saved statistics bound the agreement of analytic and numeric gradients.
    tol = dict(atol=1e-4, rtol=1e-3)
    check = torch.autograd.gradcheck
    assert check(lambda x, w: emulated.rms_norm(x, w, 1e-6), (x, w), **tol)
    assert check(lambda x, w, b: emulated.layer_norm(x, w, b, 1e-5), (x, w, b), **tol)
    assert check(lambda x, w: emulated.layer_norm(x, w, None, 1e-5), (x, w), **tol)
    assert check(lambda x, w: _norm_op(x, w, None, 1e-6, True), (x, w), **tol)
    assert check(lambda x, w, b: _norm_op(x, w, b, 1e-5, False), (x, w, b), **tol)


@pytest.mark.parametrize("door", ["eager", "op"])
@pytest.mark.parametrize("bias", [True, False])
def test_norm_grads_match_reference(emulated, door, bias):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True) if bias else None
    grad = torch.randn(4, 7, 32)
    leaves = [x, w] + ([b] if bias else [])
    fused = emulated.layer_norm(x, w, b, 1e-5) if door == "eager" else _norm_op(x, w, b, 1e-5, False)
    ref = loader.layer_norm_reference(x, w, b, 1e-5)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(fused, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rms", [True, False])
def test_norm_with_residual_adds_the_stream_gradient_into_dx(emulated, monkeypatch, rms):
    """The residual stream handed back by the norm brings its gradient to the norm's backward,
    which passes it to the kernel (one call, no separate add); the gradients are those of
    using x twice."""
    calls = []
    real = EmulatedExtension.norm_backward
    monkeypatch.setattr(EmulatedExtension, "norm_backward",
                        staticmethod(lambda *a, **k: calls.append(a[8] is not None) or real(*a, **k)))
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = None if rms else torch.randn(32, requires_grad=True)
    grad_y, grad_stream = torch.randn(4, 7, 32), torch.randn(4, 7, 32)
    leaves = [t for t in (x, w, b) if t is not None]

    def reference(t):
        return loader.rms_norm_reference(t, w, 1e-5) if rms else loader.layer_norm_reference(t, w, b, 1e-5)

    y, stream = emulated.norm_with_residual(x, w, b, 1e-5, rms)
    got = torch.autograd.grad((y * grad_y).sum() + (stream * 2 * grad_stream).sum(), leaves)
    want = torch.autograd.grad((reference(x) * grad_y).sum() + (x * 2 * grad_stream).sum(), leaves)
    assert calls == [True]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # Only the stream used: its gradient passes through, no kernel call.
    y, stream = emulated.norm_with_residual(x, w, b, 1e-5, rms)
    (dx,) = torch.autograd.grad((stream * grad_stream).sum(), x)
    assert torch.equal(dx, grad_stream) and calls == [True]
    # An x that needs no gradient (a frozen embedding below) goes on as it is, and only the
    # weights' gradients are made.
    frozen_x = x.detach()
    y, stream = emulated.norm_with_residual(frozen_x, w, b, 1e-5, rms)
    assert stream is frozen_x
    got = torch.autograd.grad((y * grad_y).sum(), leaves[1:])
    for g, r in zip(got, torch.autograd.grad((reference(frozen_x) * grad_y).sum(), leaves[1:])):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert calls == [True, False]


def test_norm_with_residual_dispatch_on_cpu():
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(16)
    y, stream = loader.norm_with_residual(x, w, None, 1e-6, True)
    assert stream is x and torch.equal(y, loader.rms_norm_reference(x, w, 1e-6))


def test_norm_weight_grad_only_when_needed(emulated, monkeypatch):
    seen = []
    real = EmulatedExtension.norm_backward
    monkeypatch.setattr(EmulatedExtension, "norm_backward",
                        staticmethod(lambda *a, **k: seen.append(a[7]) or real(*a, **k)))
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16)  # frozen weight
    emulated.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None and seen == [False]


def test_norm_casts_odd_weight_dtype(emulated):
    x = torch.randn(3, 16, dtype=torch.float32)
    w = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)  # neither x's dtype nor fp32
    y = emulated.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, loader.rms_norm_reference(x, w, 1e-6))
    y.sum().backward()
    assert w.grad.dtype == torch.bfloat16


def test_softmax_gradcheck_eager_and_op(emulated):
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 1, 8) > 0.7
    check = torch.autograd.gradcheck
    assert check(lambda s: emulated.scaled_masked_softmax(s, mask, 0.5, True), (scores,))
    assert check(lambda s: emulated.scaled_masked_softmax(s, None, 2.0, False), (scores,))
    assert check(lambda s: fused_ops.softmax_fwd(s, mask, 0.5, True), (scores,))


def test_swiglu_op_matches_reference_and_gradcheck(emulated):
    from csrc import elementwise_ops
    from models.fused_elementwise import swiglu

    torch.manual_seed(0)
    h = torch.randn(3, 5, 2 * 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(elementwise_ops.swiglu(h), swiglu(h))
    assert torch.autograd.gradcheck(elementwise_ops.swiglu, (h,))
    # A strided input is made dense first (the kernels read 16-byte vectors of contiguous rows).
    wide = torch.randn(3, 4 * 8, dtype=torch.float64)[:, : 2 * 8]
    torch.testing.assert_close(elementwise_ops.swiglu(wide), swiglu(wide))


@pytest.mark.parametrize("tables", ["shared", "per-sample"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_split_qkv_rope_op_matches_reference_and_gradcheck(emulated, heads, kv_heads, tables):
    from csrc import elementwise_ops
    from models.fused_elementwise import split_qkv_rope_sbnd
    from models.rope import rope_cache

    torch.manual_seed(0)
    s, b, d = 5, 2, 8
    qkv = torch.randn(s, b, (heads + 2 * kv_heads) * d, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]) if tables == "per-sample" else None
    cos, sin = (t.double() for t in rope_cache(s, d, 10000.0, "cpu", positions))
    got = elementwise_ops.split_qkv_rope(qkv, cos, sin, heads, kv_heads)
    for a, w in zip(got, split_qkv_rope_sbnd(qkv, cos, sin, heads, kv_heads, d)):
        torch.testing.assert_close(a, w)
    assert torch.autograd.gradcheck(lambda x: elementwise_ops.split_qkv_rope(x, cos, sin, heads, kv_heads), (qkv,))
    # k and v outside the loss: autograd hands the backward zeros for their gradients.
    only_q = torch.autograd.grad(elementwise_ops.split_qkv_rope(qkv, cos, sin, heads, kv_heads)[0].sum(), qkv)[0]
    want = torch.autograd.grad(split_qkv_rope_sbnd(qkv, cos, sin, heads, kv_heads, d)[0].sum(), qkv)[0]
    torch.testing.assert_close(only_q, want)


def test_elementwise_support_checks():
    from csrc import elementwise_ops

    assert elementwise_ops.swiglu_supported(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert not elementwise_ops.swiglu_supported(torch.zeros(4, 24, dtype=torch.bfloat16))  # f = 12
    assert not elementwise_ops.swiglu_supported(torch.zeros(4, 32, dtype=torch.float64))
    cos = torch.zeros(6, 32)
    qkv = torch.zeros(6, 2, (4 + 2 * 2) * 32, dtype=torch.bfloat16)
    assert elementwise_ops.qkv_rope_supported(qkv, cos, cos, 4, 2, 32)
    assert not elementwise_ops.qkv_rope_supported(qkv, cos[:5], cos[:5], 4, 2, 32)  # not one row per position
    per_sample = cos.expand(2, 6, 32)  # [b, s, d]: explicit position ids
    assert elementwise_ops.qkv_rope_supported(qkv, per_sample, per_sample, 4, 2, 32)
    assert not elementwise_ops.qkv_rope_supported(qkv, cos.expand(3, 6, 32), cos.expand(3, 6, 32), 4, 2, 32)
    assert not elementwise_ops.qkv_rope_supported(qkv, cos, per_sample, 4, 2, 32)  # one shape for both
    narrow = torch.zeros(6, 2, (4 + 2 * 2) * 8, dtype=torch.bfloat16)  # half a head below one bf16 vector
    assert not elementwise_ops.qkv_rope_supported(narrow, cos[:, :8], cos[:, :8], 4, 2, 8)
    assert elementwise_ops.qkv_rope_supported(narrow.float(), cos[:, :8], cos[:, :8], 4, 2, 8)
    # On CPU the dispatchers never pick the kernels.
    assert not loader.swiglu_supported(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert not loader.split_qkv_rope_supported(qkv, cos, cos, 4, 2, 32)


def test_compiled_graph_uses_the_ops(emulated):
    """torch.compile (fullgraph) takes the custom-op door, forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    scores = torch.randn(2, 2, 8, 16, requires_grad=True)

    def f(x, w, scores):
        n = emulated.rms_norm(x, w, 1e-6) + emulated.layer_norm(x, w, None, 1e-5)
        return n.sum() + (emulated.scaled_masked_softmax(scores, None, 0.3, True) * scores).sum()

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=recording_backend, fullgraph=True)(x, w, scores)
    assert "trellis.norm_fwd" in graphs[0] and "trellis.softmax_fwd" in graphs[0]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, scores), (x, w, scores))
    want = torch.autograd.grad(f(x, w, scores), (x, w, scores))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ops_fake_shapes_with_fake_cuda_tensors():
    """Shapes from the fake implementations, as torch.compile sees them. (Autograd on fake
    CUDA tensors needs a CUDA build of torch, so the backward ops are called directly.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(64, device="cuda", dtype=torch.float32)
        y, mean, rstd = fused_ops.norm_fwd(x, w, w, 1e-5, False)
        assert y.shape == x.shape and y.dtype == x.dtype and mean.shape == rstd.shape == (10,)
        assert fused_ops.norm_fwd(x, w, None, 1e-5, True)[1].shape == (0,)
        dx, dw, db = fused_ops.norm_bwd(y, x, w, mean, rstd, True, False, True)
        assert dx.shape == x.shape and dw.shape == db.shape == w.shape and dw.dtype == w.dtype
        dx, dw, db = fused_ops.norm_bwd(y, x, w, rstd, rstd, False, True, False)
        assert dw.shape == db.shape == (0,)
        s = torch.empty(2, 3, 16, 32, device="cuda", dtype=torch.float16)
        p = fused_ops.softmax_fwd(s, None, 0.1, True)
        assert p.shape == s.shape and p.dtype == s.dtype
        assert fused_ops.softmax_bwd(p, p, 0.1, True).shape == s.shape


def test_dispatch_traces_under_torch_compile():
    """The dispatchers compile without graph breaks on CPU (they take the reference path)."""
    x, w = torch.randn(4, 64), torch.randn(64)

    def f(x, w):
        return loader.rms_norm(x, w, 1e-6) + loader.layer_norm(x, w, None, 1e-5)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))

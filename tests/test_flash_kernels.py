"""The flash-attention package adapters (models/flash_kernels.py), run on the CPU against stand-in
packages that compute with SDPA but insist on each package's calling convention: the layout
Trellis hands them, the varlen boundaries of packed documents, and when `auto` may pick them."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models import attention, flash_kernels
from tests.test_attention_backends import _packed_inputs, per_document


def _sdpa_bsnd(q, k, v):
    """Causal attention of [b, s, n, d] tensors (GQA by head groups), as a flash kernel computes it."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _varlen(q, k, v, cu, max_len):
    assert q.dim() == 3 and cu.dtype == torch.int32 and int(cu[-1]) == q.shape[0]
    assert max_len == int(torch.diff(cu).max())
    pieces = [_sdpa_bsnd(q[a:b][None], k[a:b][None], v[a:b][None])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(pieces)


def _fake_flash4():
    """flash_attn.cute's two functions: keyword arguments, (out, lse) returned, no dropout."""
    def flash_attn_func(q, k, v, causal=False):
        assert causal and q.dim() == 4 and q.stride(-1) == 1
        return _sdpa_bsnd(q, k, v), None

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               causal=False):
        assert causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        return _varlen(q, k, v, cu_seqlens_q, max_seqlen_q), None

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                                 interface=_fake_flash4_interface())


def _fake_flash4_interface():
    """flash_attn.cute.interface's forward that writes into a given `out` and its backward,
    which takes the saved tensors and returns (dq, dk, dv, ...) like q, k, v."""
    def _flash_attn_fwd(q, k, v, causal=False, out=None):
        assert causal and out is not None and out.shape == q.shape
        out.copy_(_sdpa_bsnd(q.detach(), k.detach(), v.detach()))
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1]), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, causal=False):
        assert causal and lse is not None
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            grads = torch.autograd.grad(_sdpa_bsnd(*leaves), leaves, dout)
        return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))

    return types.SimpleNamespace(_flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)


def _fake_flash2():
    """flash_attn's two functions: positional boundaries, the output alone, dropout_p."""
    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        assert causal and dropout_p == 0.0
        return _sdpa_bsnd(q, k, v)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
        assert causal and cu_q is cu_k and max_q == max_k
        return _varlen(q, k, v, cu_q, max_q)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


@pytest.mark.parametrize("package", ["flash2", "flash4"])
@pytest.mark.parametrize("gqa", [False, True])
def test_flash_backend_equals_sdpa_and_each_document_alone(monkeypatch, package, gqa):
    kernels = flash_kernels._flash2(_fake_flash2()) if package == "flash2" else flash_kernels._flash4(_fake_flash4())
    monkeypatch.setattr(attention, "flash_kernels", lambda: kernels)
    q, k, v, document_ids = _packed_inputs(gqa)
    torch.testing.assert_close(attention._flash(q, k, v, 0.0, None),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
    # packed documents, including a row of one document and ids that restart in the next row
    torch.testing.assert_close(attention._flash(q, k, v, 0.0, document_ids), per_document(q, k, v, document_ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gqa", [False, True])
def test_flash4_output_in_q_layout(monkeypatch, gqa):
    """FA4's dense output is allocated like q, so Trellis's [s, b, n, d] activations view it
    without a copy; outputs and gradients equal SDPA's, and the gradients keep q, k, v's layout."""
    cute = _fake_flash4()
    kernels = flash_kernels._flash4(cute, cute.interface)
    monkeypatch.setattr(attention, "flash_kernels", lambda: kernels)
    q, k, v = (t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_() for t in _packed_inputs(gqa)[:3])
    assert q.permute(2, 0, 1, 3).is_contiguous()  # [b, n, s, d] views of [s, b, n, d] storage, as the layers hand them
    out = attention._flash(q, k, v, 0.0, None)
    assert out.stride() == q.stride()
    out.permute(2, 0, 1, 3).view(q.shape[2], q.shape[0], -1)  # a view: no copy for the output projection
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)
    expected.backward(dout)
    torch.testing.assert_close(out, expected)
    for got, want in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad, want.grad)
        assert got.grad.stride() == got.stride()


def test_flash4_without_the_output_taking_forward_uses_the_public_function():
    """An FA4 release whose private forward lacks `out` (or has no such function) falls back
    to flash_attn_func, whose output then needs the copy."""
    cute = _fake_flash4()
    assert flash_kernels._flash4(cute, cute.interface).dense.__name__ == "dense_in_q_layout"
    assert flash_kernels._flash4(cute, None).dense.__name__ == "dense_public"
    no_out = types.SimpleNamespace(_flash_attn_fwd=lambda q, k, v, causal=False: None,
                                   _flash_attn_bwd=cute.interface._flash_attn_bwd)
    assert flash_kernels._flash4(cute, no_out).dense.__name__ == "dense_public"
    reordered = types.SimpleNamespace(_flash_attn_fwd=cute.interface._flash_attn_fwd,
                                      _flash_attn_bwd=lambda dout, q, k, v, out, lse, causal=False: None)
    assert flash_kernels._flash4(cute, reordered).dense.__name__ == "dense_public"
    q, k, v, _ = _packed_inputs(False)
    torch.testing.assert_close(flash_kernels._flash4(cute, None).dense(*(t.transpose(1, 2) for t in (q, k, v)), 0.0),
                               _sdpa_bsnd(*(t.transpose(1, 2) for t in (q, k, v))))


def test_varlen_boundaries_read_once_per_forward(monkeypatch):
    """The boundaries cost a device sync (the longest document goes to the host): the layers of
    one forward share them, and a new batch gets its own."""
    monkeypatch.setattr(attention, "flash_kernels", lambda: flash_kernels._flash4(_fake_flash4()))
    built = []
    original = attention._varlen_boundaries
    monkeypatch.setattr(attention, "_varlen_boundaries", lambda ids: built.append(1) or original(ids))
    q, k, v, document_ids = _packed_inputs(False)
    assert original(document_ids)[1] == 12 and original(document_ids)[0].tolist() == [0, 5, 9, 12, 24]
    for _ in range(3):
        attention._flash(q, k, v, 0.0, document_ids)
    assert len(built) == 1
    attention._flash(q, k, v, 0.0, document_ids.clone())
    assert len(built) == 2


def test_when_flash_kernels_may_run(monkeypatch):
    kernels = flash_kernels._flash4(_fake_flash4())
    monkeypatch.setattr(attention, "flash_kernels", lambda: kernels)
    q, _, _, document_ids = _packed_inputs(False)
    assert "dropout" in kernels.unusable_reason(q, 0.1)
    assert "CUDA" in kernels.unusable_reason(q, 0.0)
    assert flash_kernels._flash2(_fake_flash2()).unusable_reason(q, 0.1) == "flash attention runs on CUDA tensors only"
    assert attention.choose_backend("auto", q, None) == "sdpa"
    assert attention.choose_backend("auto", q, document_ids, 0.1) == "sdpa"
    with pytest.raises(RuntimeError, match="no attention dropout"):
        attention.choose_backend("flash", q, None, 0.1)
    monkeypatch.setattr(attention, "flash_kernels", lambda: None)
    with pytest.raises(RuntimeError, match="no flash-attn package can be imported"):
        attention.choose_backend("flash", q, None)


def test_package_detection(monkeypatch):
    """FlashAttention-2's top-level functions win; a `flash_attn` holding only `cute` (the
    flash-attn-4 wheel) gives the CuTe kernels; neither gives None."""
    def detect(modules):
        for name in ("flash_attn", "flash_attn.cute"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        flash_kernels._detect.cache_clear()
        try:
            found = flash_kernels.flash_kernels()
        finally:
            flash_kernels._detect.cache_clear()
        return found and found.name

    fa2 = types.ModuleType("flash_attn")
    fa2.__dict__.update(vars(_fake_flash2()))
    assert detect({"flash_attn": fa2}) == "flash-attn 2"
    namespace, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.__dict__.update(vars(_fake_flash4()))
    namespace.cute = cute
    assert detect({"flash_attn": namespace, "flash_attn.cute": cute}) == "flash-attn 4 (CuTe)"
    assert detect({"flash_attn": None}) is None  # a None entry makes the import fail
    assert detect({"flash_attn": types.ModuleType("flash_attn")}) is None  # neither API inside
    assert "cute" in flash_kernels.flash_import_error()


def test_auto_takes_flash_attn_2_but_not_4(monkeypatch):
    """What auto picks where both could run (a CUDA bf16 call), with the device check passed."""
    q = torch.zeros(1, 2, 4, 8)
    for kernels, expected in ((flash_kernels._flash2(_fake_flash2()), "flash"),
                              (flash_kernels._flash4(_fake_flash4()), "sdpa")):
        monkeypatch.setattr(type(kernels), "unusable_reason", lambda self, q, dropout: None)
        monkeypatch.setattr(attention, "flash_kernels", lambda: kernels)
        assert attention.choose_backend("auto", q, None) == expected
        assert attention.choose_backend("flash", q, None) == "flash"

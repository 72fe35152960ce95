"""Transformer Engine's attention backend (`model.attention_backend te`, models/te_attention.py)
on the CPU stand-in for TE (tests/fake_transformer_engine.py): the layouts and document
boundaries Trellis hands it give the SDPA backend's results, forward and backward, in a layer
and in training. The real library runs in tests/gpu/test_te_attention_gpu.py."""
import pytest
import torch

from models import attention, te_attention
from tests.distributed import run_distributed
from tests.test_te_fp8 import fake_te_installed  # noqa: F401 (a fixture)


@pytest.fixture
def te_runs_on_cpu(fake_te_installed, monkeypatch):  # noqa: F811
    monkeypatch.setattr(te_attention, "unusable_reason", lambda q, dropout: None)
    te_attention._modules.clear()
    yield
    te_attention._modules.clear()


def _layer_inputs(gqa: bool):
    """q, k, v as the layer makes them: [b, n, s, d] views of [s, b, n, d] storage."""
    torch.manual_seed(0)
    s, b, heads, kv_heads, d = 12, 2, 4, (2 if gqa else 4), 8
    q = torch.randn(s, b, heads, d).permute(1, 2, 0, 3).requires_grad_()
    k, v = (torch.randn(s, b, kv_heads, d).permute(1, 2, 0, 3).requires_grad_() for _ in range(2))
    document_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    return q, k, v, document_ids


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_te_backend_equals_sdpa_forward_and_backward(te_runs_on_cpu, gqa, packed):
    q, k, v, document_ids = _layer_inputs(gqa)
    document_ids = document_ids if packed else None
    results = {}
    for backend in ("te", "sdpa"):
        out = attention.attend(q, k, v, document_ids=document_ids, backend=backend)
        grad = torch.autograd.grad(out, (q, k, v), torch.ones_like(out).cumsum(-2))
        results[backend] = (out, *grad)
    for te_value, sdpa_value in zip(results["te"], results["sdpa"]):
        torch.testing.assert_close(te_value, sdpa_value, rtol=1e-5, atol=1e-5)
    out = results["te"][0]
    # The layer reads it as [s, b, n * d]: TE's own output, no copy
    assert out.permute(2, 0, 1, 3).is_contiguous() or packed
    assert [m.calls for m in te_attention._modules.values()] == [1]  # TE computed it


def test_te_backend_says_why_it_cannot_run(monkeypatch):
    q = torch.randn(1, 2, 16, 8)
    monkeypatch.setattr(te_attention, "import_te", lambda: (None, "ModuleNotFoundError: no transformer_engine"))
    with pytest.raises(RuntimeError, match="attention_backend is te, but transformer_engine cannot be imported"):
        attention.choose_backend("te", q, None)
    monkeypatch.setattr(te_attention, "import_te", lambda: ((object(), object()), ""))
    for kwargs, why in [({"dropout": 0.1}, "without dropout"), ({}, "CUDA tensors only")]:
        with pytest.raises(RuntimeError, match=why):
            attention.choose_backend("te", q, None, **kwargs)


def _train(backend: str, layout: dict):
    from tests import fake_transformer_engine as fake_te
    from tests.optimizer_harness import train_steps

    if backend == "te":
        fake_te.install()
        te_attention.unusable_reason = lambda q, dropout: None  # the stand-in runs on CPU
    result = train_steps({"model": {"attention_backend": backend}, "train": {"iters": 2}, **layout})
    result["te_calls"] = sum(module.calls for module in te_attention._modules.values())
    return result


@pytest.mark.parametrize("world,layout", [(1, {}), (2, {"parallel": {"tp": 2, "sp": True}})], ids=["serial", "tp2-sp"])
def test_training_through_te_attention_equals_sdpa(world, layout):
    """Under TP each rank's module gets its local heads (and local KV heads)."""
    te, sdpa = run_distributed(_train, world, "te", layout), run_distributed(_train, world, "sdpa", layout)
    torch.testing.assert_close(te[0]["loss"], sdpa[0]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(te[0]["grad_norm"], sdpa[0]["grad_norm"], rtol=1e-5, atol=0)
    assert te[0]["te_calls"] > 0 and sdpa[0]["te_calls"] == 0

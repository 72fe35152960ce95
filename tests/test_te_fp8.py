"""Transformer Engine as the FP8 backend (parallel/te_fp8.py): when it is chosen, the recipe it
gets, and how its linears are wired into Trellis's layers (the layer's own weight, gradients into
main_grad once per micro-batch, weights quantised once per step), on a CPU stand-in of TE's
calling conventions (tests/fake_transformer_engine.py). The real library: tests/gpu/test_te_fp8_gpu.py."""
import os
import sys

import pytest
import torch

from parallel import fp8, te_fp8, te_import
from parallel.main_grad_linear import take_filled_flag
from tests import fake_transformer_engine as fake_te
from tests.distributed import run_distributed

CUDA = torch.device("cuda")


@pytest.fixture
def fake_te_installed(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    fake_te.install()
    te_fp8.import_te.cache_clear()
    fake_te._State.calls = []
    yield
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        del sys.modules[name]
    te_fp8.import_te.cache_clear()


def test_without_transformer_engine_auto_keeps_trellis_and_te_says_why(monkeypatch):
    monkeypatch.setattr(te_fp8, "import_te", lambda: (None, "ModuleNotFoundError: No module named 'transformer_engine'"))
    recipe = fp8.FP8Recipe()
    assert te_fp8.resolve_backend("auto", recipe, CUDA) == "trellis"
    assert te_fp8.resolve_backend("trellis", recipe, CUDA) == "trellis"
    with pytest.raises(RuntimeError, match="train.fp8_backend is te, but transformer_engine cannot be imported"):
        te_fp8.resolve_backend("te", recipe, CUDA)


def test_cudnn_home_is_set_only_while_te_imports(fake_te_installed, monkeypatch):
    """Left set, CUDNN_HOME would change the build commands of Trellis's cached kernels (torch's
    extension builder adds its paths), and every process importing TE would rebuild them."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("CUDNN_HOME", raising=False)
    seen = {}
    monkeypatch.setattr(te_import, "_load_torchs_cudnn", lambda: "/torch/lib/cudnn")
    with te_import._cudnn_home("/torch/lib/cudnn"):
        seen["during"] = os.environ.get("CUDNN_HOME")
    assert seen["during"] == "/torch/lib/cudnn" and "CUDNN_HOME" not in os.environ
    te_fp8.import_te.cache_clear()
    assert te_fp8.import_te()[0] is not None and "CUDNN_HOME" not in os.environ
    assert cpp_extension.CUDNN_HOME != "/torch/lib/cudnn"


def test_auto_takes_te_only_where_it_can_run_the_run(fake_te_installed):
    tensor, row, history = fp8.FP8Recipe(), fp8.FP8Recipe(rowwise=True), fp8.FP8Recipe(amax_history=16)
    assert te_fp8.resolve_backend("auto", tensor, CUDA) == "te"
    assert te_fp8.resolve_backend("trellis", tensor, CUDA) == "trellis"
    for recipe, device, compile_layers, graphs, why in [
            (row, CUDA, False, False, "fp8_scaling row"), (history, CUDA, False, False, "delayed scaling"),
            (tensor, torch.device("cpu"), False, False, "CUDA only"),
            (tensor, CUDA, True, False, "model.compile"), (tensor, CUDA, False, True, "model.cuda_graphs")]:
        assert te_fp8.resolve_backend("auto", recipe, device, compile_layers, graphs) == "trellis"
        with pytest.raises(RuntimeError, match=why):
            te_fp8.resolve_backend("te", recipe, device, compile_layers, graphs)


def test_recipes_map_to_their_transformer_engine_counterparts(fake_te_installed):
    current = te_fp8.te_recipe(fp8.FP8Recipe())
    assert isinstance(current, fake_te.Float8CurrentScaling) and current.kwargs == {"fp8_format": fake_te.Format.HYBRID}
    e4m3 = te_fp8.te_recipe(fp8.FP8Recipe.from_names("e4m3", "tensor", 1))
    assert e4m3.kwargs["fp8_format"] == fake_te.Format.E4M3
    for refused in (fp8.FP8Recipe(amax_history=16), fp8.FP8Recipe(rowwise=True)):
        with pytest.raises(ValueError, match="per-linear autocast"):
            te_fp8.te_recipe(refused)


def test_linear_computes_with_the_layers_weight_and_fills_main_grad(fake_te_installed):
    torch.manual_seed(0)
    linear = te_fp8.te_linear_fn(fp8.FP8Recipe())
    weight = torch.nn.Parameter(torch.randn(48, 64))
    weight.main_grad = torch.zeros(48, 64)
    x, grad = torch.randn(16, 2, 64), torch.randn(16, 2, 48)
    fp8.clear_weight_cache()
    for _ in range(3):  # three micro-batches of one step
        y = linear(x, weight)
        torch.testing.assert_close(y, x @ weight.detach().t())
        y.backward(grad)
        assert take_filled_flag(weight) and not take_filled_flag(weight)  # marked once, then cleared
    expected = 3 * grad.reshape(-1, 48).t() @ x.reshape(-1, 64)
    torch.testing.assert_close(weight.main_grad, expected, rtol=1e-5, atol=1e-5)
    assert [first for _, first, _ in fake_te._State.calls] == [True, False, False]
    assert {weight_id for weight_id, _, _ in fake_te._State.calls} == {id(weight)}  # TE computes with it
    fp8.clear_weight_cache()  # the optimizer's step: quantised again
    linear(x, weight)
    with torch.no_grad():
        weight.mul_(2)  # an in-place write within the step: quantised again
    torch.testing.assert_close(linear(x, weight), x @ weight.detach().t())
    linear(x, weight)
    assert [first for _, first, _ in fake_te._State.calls[3:]] == [True, True, False]


def test_frozen_weights_and_odd_shapes(fake_te_installed):
    linear = te_fp8.te_linear_fn(fp8.FP8Recipe())
    frozen = torch.randn(48, 64)
    linear(torch.randn(16, 64), frozen)
    assert fake_te._State.calls[-1][1] is None  # quantised every call, as Trellis's path does for frozen weights
    odd = torch.randn(40, 64)  # an output size FP8 GEMMs cannot take: plain matmul, TE not called
    assert linear(torch.randn(16, 64), odd, torch.ones(40)).shape == (16, 40)
    assert len(fake_te._State.calls) == 1


LAYOUTS = {  # each with 2 ranks
    "dp2-sharded": {"optim": {"shard": True, "overlap_grad_reduce": True, "bucket_mb": 0.05}},
    "tp2-sp": {"parallel": {"tp": 2, "sp": True}},
    "pp2-interleaved": {"parallel": {"pp": 2, "vpp": 2}},
}


def _train(backend: str, layout: str, precision: str = "fp8"):
    from tests.optimizer_harness import train_steps

    if backend == "te":
        fake_te.install()
        te_fp8.unusable_reason = lambda *args, **kwargs: None  # the stand-in runs on CPU
    result = train_steps({"train": {"precision": precision, "fp8_backend": backend, "iters": 3}, **LAYOUTS[layout]})
    result["calls"] = [(weight_id, first) for weight_id, first, _ in fake_te._State.calls]
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_through_te_linears_equals_the_bf16_run(layout):
    """With the stand-in's exact matmuls the losses and gradient norms are those of the bf16 run
    in the same layout; with the sharded optimizer every bucket's reduction still starts in the
    backward (TE's placeholder gradients reach the hooks); and in every layout, the pipeline's
    interleaved schedule included, each weight's FP8 copy is made on its step's first micro-batch
    only, the one whose backward TE lets overwrite main_grad."""
    te, bf16 = run_distributed(_train, 2, "te", layout), run_distributed(_train, 2, "trellis", layout, "bf16")
    if LAYOUTS[layout].get("optim", {}).get("overlap_grad_reduce"):
        for record in te[0]["records"]:
            assert record["buckets"] > 3 and record["launched_in_backward"] == record["buckets"]
    torch.testing.assert_close(te[0]["loss"], bf16[0]["loss"], rtol=1e-2, atol=0)
    torch.testing.assert_close(te[0]["grad_norm"], bf16[0]["grad_norm"], rtol=2e-2, atol=0)
    assert te[0]["weights"].keys() == bf16[0]["weights"].keys()  # no TE modules among the layer's
    for rank in te:
        by_weight = {}
        for weight_id, first in rank["calls"]:
            by_weight.setdefault(weight_id, []).append(first)
        micro_batches = len(next(iter(by_weight.values()))) // 3
        assert by_weight and micro_batches >= 2
        for flags in by_weight.values():
            assert flags == ([True] + [False] * (micro_batches - 1)) * 3

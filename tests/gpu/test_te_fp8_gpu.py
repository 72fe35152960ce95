"""Transformer Engine as the FP8 backend on a GPU (parallel/te_fp8.py): its linears stay as close
to full precision as Trellis's own FP8 path at real layer shapes, for each recipe it takes; the
weight gradient lands in main_grad once per micro-batch; and a short training run through it
follows the one through Trellis's path. Skipped where transformer_engine does not import.
Run on a CUDA machine with FP8 (sm89+): `python3 -m pytest tests/gpu/test_te_fp8_gpu.py -q`."""
import pytest
import torch

from parallel import fp8, te_fp8
from parallel.main_grad_linear import take_filled_flag

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or te_fp8.unusable_reason(fp8.FP8Recipe(), torch.device("cuda")) is not None,
    reason="needs a CUDA GPU with FP8 and transformer_engine")
RECIPES = {"hybrid-current": fp8.FP8Recipe(), "e4m3-current": fp8.FP8Recipe(grad_dtype=fp8.E4M3)}


def rel(a, b):
    return float((a.float() - b).norm() / b.norm())


def _errors(make_linear, recipe, x, weight, grad, micro_batches=2):
    """Relative errors of y, x.grad and main_grad against fp32 after `micro_batches` passes."""
    x = x.detach().clone().requires_grad_()
    weight.main_grad = torch.zeros(weight.shape, device="cuda")
    linear = make_linear(recipe)
    fp8.clear_weight_cache()
    for _ in range(micro_batches):
        y = linear(x, weight)
        y.backward(grad)
        take_filled_flag(weight)
    ref_x = x.detach().float()
    ref_y = ref_x @ weight.detach().float().t()
    ref_dx = grad.float() @ weight.detach().float()
    ref_w = grad.float().reshape(-1, grad.shape[-1]).t() @ ref_x.reshape(-1, ref_x.shape[-1])
    return rel(y, ref_y), rel(x.grad, micro_batches * ref_dx), rel(weight.main_grad, micro_batches * ref_w)


@pytest.mark.parametrize("name", list(RECIPES))
def test_te_linear_is_as_close_to_fp32_as_trellis_fp8(name):
    torch.manual_seed(1)
    x = torch.randn(1024, 2, 2048, device="cuda", dtype=torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(5632, 2048, device="cuda", dtype=torch.bfloat16) * 0.02)
    grad = torch.randn(1024, 2, 5632, device="cuda", dtype=torch.bfloat16)
    te = _errors(te_fp8.te_linear_fn, RECIPES[name], x, weight, grad)
    ours = _errors(fp8.fp8_linear_fn, RECIPES[name], x, weight, grad)
    assert te[0] < 0.06 and te[1] < 0.1 and te[2] < 0.1, te
    for te_error, our_error in zip(te, ours):
        assert te_error < 1.5 * our_error + 0.005, (te, ours)


def test_weight_copy_follows_the_step_and_in_place_writes():
    torch.manual_seed(2)
    linear = te_fp8.te_linear_fn(fp8.FP8Recipe())
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16) * 0.02)
    fp8.clear_weight_cache()
    first = linear(x, weight)
    with torch.no_grad():
        weight.mul_(-1)  # within the step: the FP8 copy must follow
    assert rel(linear(x, weight), -first.float()) < 1e-6
    weight.data.mul_(-1)  # unseen by the version counter: the next step's clear is what makes it current
    fp8.clear_weight_cache()
    assert rel(linear(x, weight), first.float()) < 1e-6


def _train(backend: str, iters: int = 30) -> list:
    import os

    from engine.config import apply_mapping, Config, validate
    from engine.training import Trainer, shutdown

    os.environ.setdefault("WORLD_SIZE", "1")
    cfg = Config()
    apply_mapping(cfg, {
        "model": {"preset": "tiny", "hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 704,
                  "seq_length": 256},
        "train": {"iters": iters, "micro_batch_size": 4, "global_batch_size": 8, "lr": 1e-3, "warmup_iters": 5,
                  "precision": "fp8", "fp8_backend": backend, "device": "cuda", "seed": 3,
                  "output_dir": f"/tmp/trellis_te_{backend}"},
        "data": {"mock": True}, "log": {"quiet": True}})
    trainer = Trainer(validate(cfg, 1))
    assert trainer.fp8_backend == backend
    losses = [trainer.train_step()["loss"] for _ in range(iters)]
    shutdown()
    return losses


def test_training_through_te_follows_trellis_fp8():
    te, ours = _train("te"), _train("trellis")
    assert te[0] == pytest.approx(ours[0], rel=1e-2)
    assert sum(te[-5:]) / 5 == pytest.approx(sum(ours[-5:]) / 5, rel=2e-2), (te, ours)
    assert ours[-1] < 0.8 * ours[0]  # the run learns, so the comparison means something

"""The AdamW kernel (csrc/adamw.cu) against loader.adamw_step_reference (torch.optim.AdamW's ops)
on the same GPU: lengths below one vector, with a scalar tail, and long enough for the grid-stride
loop to go round; bf16, fp16 and no model output; with and without a gradient scale; with and
without weight decay; three steps, so the bias corrections and the moments' history count. The
model output is the kernel's own master rounded; the gradient is left as it was; misaligned or
mismatched tensors are refused by the kernel and taken by the reference through the dispatch."""
import pytest
import torch

from csrc import loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = [1, 3, 4, 5, 1003, 4096, 5_000_003]  # 5M: more vectors than one pass of the grid holds
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


@pytest.fixture(scope="module")
def ext():
    return loader.build_kernels()  # a build failure fails the tests instead of skipping them


def state(n: int, seed: int) -> list:
    """master, exp_avg, exp_avg_sq after some history (a non-zero start)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    master = torch.randn(n, device="cuda", generator=gen)
    exp_avg = torch.randn(n, device="cuda", generator=gen) * 0.1
    exp_avg_sq = torch.rand(n, device="cuda", generator=gen) * 0.01
    return [master, exp_avg, exp_avg_sq]


def gradient(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, None])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_matches_reference(ext, n, model_dtype, scaled, weight_decay):
    kernel_state, reference_state = state(n, 0), state(n, 0)
    model = None if model_dtype is None else torch.empty(n, device="cuda", dtype=model_dtype)
    reference_model = None if model is None else torch.empty_like(model)
    scale = torch.tensor(0.37, device="cuda") if scaled else None
    for step in range(4, 7):  # a run resumed at step 4
        grad = gradient(n, step)
        kept = grad.clone()
        options = dict(HYPER, weight_decay=weight_decay, step=step, grad_scale=scale)
        ext.adamw_step(kernel_state[0], grad, kernel_state[1], kernel_state[2], model, **options)
        loader.adamw_step_reference(reference_state[0], grad, reference_state[1], reference_state[2],
                                    reference_model, **options)
        assert torch.equal(grad, kept)
        for name, got, expected in zip(("master", "exp_avg", "exp_avg_sq"), kernel_state, reference_state):
            # fp32 with fused multiply-adds against torch's separate ops: an ulp or two apart.
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} step {step}: {m}")
        if model is not None:
            assert torch.equal(model, kernel_state[0].to(model_dtype))


def test_dispatch_takes_the_kernel(ext):
    n = 1003
    through_loader, direct = state(n, 1), state(n, 1)
    model, direct_model = (torch.empty(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = gradient(n, 2)
    assert loader.fused_kernels_available()
    loader.adamw_step(through_loader[0], grad, through_loader[1], through_loader[2], model, **HYPER, weight_decay=0.1,
                      step=3)
    ext.adamw_step(direct[0], grad, direct[1], direct[2], direct_model, **HYPER, weight_decay=0.1, step=3)
    for got, expected in zip(through_loader + [model], direct + [direct_model]):
        assert torch.equal(got, expected)


def test_misaligned_tensors_are_refused_by_the_kernel_and_taken_by_the_reference(ext):
    n = 1003
    grad = gradient(n + 1, 3)[1:]  # 4 bytes past an aligned start
    assert grad.data_ptr() % 16
    master, exp_avg, exp_avg_sq = state(n, 4)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ext.adamw_step(master, grad, exp_avg, exp_avg_sq, None, **HYPER, weight_decay=0.0, step=1)
    through_loader, reference = state(n, 4), state(n, 4)
    loader.adamw_step(through_loader[0], grad, through_loader[1], through_loader[2], None, **HYPER,
                      weight_decay=0.1, step=2)
    loader.adamw_step_reference(reference[0], grad, reference[1], reference[2], None, **HYPER, weight_decay=0.1, step=2)
    for got, expected in zip(through_loader, reference):
        assert torch.equal(got, expected)


def test_bad_inputs_are_refused(ext):
    master, exp_avg, exp_avg_sq = state(64, 5)
    options = dict(HYPER, weight_decay=0.0, step=1)
    with pytest.raises(RuntimeError, match="elements"):
        ext.adamw_step(master, gradient(60, 6), exp_avg, exp_avg_sq, None, **options)
    with pytest.raises(RuntimeError, match="model_out"):
        ext.adamw_step(master, gradient(64, 6), exp_avg, exp_avg_sq, torch.empty(64, device="cuda"), **options)
    with pytest.raises(RuntimeError, match="step"):
        ext.adamw_step(master, gradient(64, 6), exp_avg, exp_avg_sq, None, **dict(options, step=0))
    with pytest.raises(RuntimeError, match="grad_scale"):
        ext.adamw_step(master, gradient(64, 6), exp_avg, exp_avg_sq, None, **options,
                       grad_scale=torch.tensor(0.5))  # on the CPU

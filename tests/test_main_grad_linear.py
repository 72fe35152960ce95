"""The default linear accumulates its weight gradient into main_grad inside the GEMM; the
gradient buffer's hook must then count it without adding it a second time."""
import pytest
import torch
import torch.nn.functional as F

from parallel import main_grad_linear
from parallel.grad_buffer import GradBuffer


def _reference_grads(x_batches, weight, bias):
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    for x in x_batches:
        F.linear(x, w, b).pow(2).sum().backward()
    return w.grad, b.grad


def test_weight_grad_goes_into_main_grad_and_the_bucket_counts_it(one_process_group):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))
    bias = torch.nn.Parameter(torch.randn(6))
    buffer = GradBuffer([("w", weight), ("b", bias)], one_process_group, bucket_numel=10**6, shard=False,
                        overlap_grad_reduce=False, microbatches=2)
    x_batches = [torch.randn(3, 4, 5, requires_grad=True) for _ in range(2)]
    for x in x_batches:
        main_grad_linear.linear(x, weight, bias).pow(2).sum().backward()
    ref_w, ref_b = _reference_grads([x.detach() for x in x_batches], weight, bias)
    torch.testing.assert_close(weight.main_grad, ref_w)
    torch.testing.assert_close(bias.main_grad, ref_b)
    assert weight.grad is None and bias.grad is None
    assert buffer.buckets[0].arrived == 4  # both parameters, both micro-batches: ready to reduce


def test_input_gradient_matches_f_linear():
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    weight.main_grad = torch.zeros(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    main_grad_linear.linear(x, weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, weight.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_without_main_grad_or_grad_mode_it_is_plain_f_linear():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(2, 3)
    assert not main_grad_linear.fuses_into_main_grad(weight)
    main_grad_linear.linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(2, 4).t() @ x)
    weight.main_grad = torch.zeros(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(main_grad_linear.linear(x, weight), x @ weight.t())


@pytest.mark.parametrize("folded", [False, True])
def test_residual_is_added_and_gets_the_output_gradient(monkeypatch, folded):
    """linear(x, w, residual=r) == r + x @ w^T with r's gradient the output's, whether the GEMM
    folds the add (emulated here: the CUDA path's contract) or it runs after the product."""
    from csrc import loader

    calls = []
    if folded:
        monkeypatch.setattr(loader, "gemm_add_supported", lambda x, w, r: True)
        monkeypatch.setattr(loader, "gemm_add", lambda x, w, r: calls.append(1) or r + x @ w.t())
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    weight.main_grad = torch.zeros(4, 3)
    x = torch.randn(5, 2, 3, requires_grad=True)
    residual = torch.randn(5, 2, 4, requires_grad=True)
    grad_out = torch.randn(5, 2, 4)
    out = main_grad_linear.linear(x, weight, None, residual)
    out.backward(grad_out)
    assert calls == ([1] if folded else [])
    torch.testing.assert_close(out, residual.detach() + x.detach() @ weight.detach().t())
    torch.testing.assert_close(residual.grad, grad_out)
    torch.testing.assert_close(weight.main_grad, grad_out.reshape(-1, 4).t() @ x.detach().reshape(-1, 3))
    torch.testing.assert_close(x.grad, grad_out @ weight.detach())
    with torch.no_grad():  # no training: the plain product and add
        torch.testing.assert_close(main_grad_linear.linear(x, weight, None, residual), out)

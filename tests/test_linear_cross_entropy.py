"""The chunked output-projection + cross-entropy gives the plain path's loss and gradients."""
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed


def _reference(hidden, weight, labels, token_weights, vocab_size):
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits[:, :vocab_size].float(), labels, reduction="none")
    return (loss * token_weights).sum(), loss


def _check(tp, vocab=21, loss_grad=None, into_main_grad=False):
    """Loss and gradients against the plain path, under a backward that scales the loss by 0.5:
    given as the incoming gradient (loss_grad None) or told to the forward (loss_grad 0.5); with
    into_main_grad the weight is sole-use and its gradient adds to its main_grad."""
    import torch.distributed as dist

    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_cross_entropy
    from parallel.mappings import copy_to_tp

    init_distributed("cpu")
    grid = build_grid(tp=tp)
    torch.manual_seed(0)
    tokens, dim, padded = 37, 16, 24  # padding rows from `vocab` on, odd chunking
    hidden = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    token_weights = torch.rand(tokens, dtype=torch.float64)
    expected_sum, expected_loss = _reference(hidden, weight, labels, token_weights, vocab)
    (expected_sum * 0.5).backward()

    per_rank = padded // tp
    rows = slice(grid.tp_rank * per_rank, (grid.tp_rank + 1) * per_rank)
    h = hidden.detach().clone().requires_grad_(True)
    dtype, tol = (torch.float32, 1e-5) if into_main_grad else (torch.float64, 1e-6)  # main_grad is fp32
    w = weight.detach()[rows].clone().to(dtype).requires_grad_(True)
    if into_main_grad:
        w.main_grad = torch.full(w.shape, 0.25)  # gradients add to what is there
    total, token_loss = linear_cross_entropy(copy_to_tp(h.to(dtype), grid.tp_group), w, labels, token_weights,
                                             grid.tp_group, rows.start, vocab, chunk=8, sole_use=into_main_grad,
                                             loss_grad=loss_grad)
    if loss_grad is not None and into_main_grad:  # the forward finished the weight's gradient
        torch.testing.assert_close(w.main_grad - 0.25, weight.grad[rows].float(), rtol=tol, atol=tol)
    (total * 0.5).backward()
    torch.testing.assert_close(total, expected_sum.to(total.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(token_loss, expected_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hidden.grad, rtol=tol, atol=tol)
    weight_grad = w.main_grad - 0.25 if into_main_grad else w.grad
    torch.testing.assert_close(weight_grad.to(weight.dtype), weight.grad[rows], rtol=tol, atol=tol)
    assert not into_main_grad or w.main_grad_filled
    dist.barrier()
    return True


def test_matches_plain_cross_entropy_serial():
    assert run_distributed(_check, 1, 1) == [True]


def test_matches_plain_cross_entropy_vocab_parallel():
    assert run_distributed(_check, 2, 2) == [True, True]


def test_vocab_parallel_with_a_rank_of_padding_only():
    """At vocab 17 of 24 rows over 4 ranks, rank 3 holds only padding: its local softmax sums
    are empty and must add nothing (not NaN) to the others'."""
    assert run_distributed(_check, 4, 4, 17) == [True] * 4


def test_loss_grad_known_in_forward_serial():
    assert run_distributed(_check, 1, 1, 21, 0.5) == [True]


def test_loss_grad_known_in_forward_into_main_grad_vocab_parallel():
    assert run_distributed(_check, 2, 2, 21, 0.5, True) == [True, True]


def test_loss_grad_unknown_into_main_grad_serial():
    assert run_distributed(_check, 1, 1, 21, None, True) == [True]


def test_backward_refuses_a_gradient_other_than_the_announced_loss_grad(one_process_group):
    """The forward scaled the gradients by loss_grad; a backward with another incoming gradient
    would give wrong gradients silently, so it is refused."""
    from parallel.linear_cross_entropy import linear_cross_entropy
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    total, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 6, (5,)), torch.ones(5), one_process_group, 0, 6,
                                    loss_grad=2.0)
    with pytest.raises(RuntimeError, match="differs from the loss_grad"):
        (total * 3.0).backward()


def _check_token_losses(tp, sole_use):
    """linear_token_losses: per-token losses and, for an arbitrary per-token gradient, the
    gradients of the plain path; with sole_use the weight gradient lands in main_grad."""
    import torch.distributed as dist

    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_token_losses
    from parallel.mappings import copy_to_tp

    init_distributed("cpu")
    grid = build_grid(tp=tp)
    torch.manual_seed(1)
    tokens, dim, padded, vocab = 29, 16, 24, 21
    hidden = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    upstream = torch.randn(tokens, dtype=torch.float64)  # e.g. DPO's d(loss)/d(token log-prob)
    _, expected = _reference(hidden, weight, labels, torch.ones(tokens, dtype=torch.float64), vocab)
    (expected * upstream).sum().backward()

    per_rank = padded // tp
    rows = slice(grid.tp_rank * per_rank, (grid.tp_rank + 1) * per_rank)
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach()[rows].clone().float().requires_grad_(True)
    if sole_use:
        w.main_grad = torch.full(w.shape, 0.25)  # gradients add to what is there
    token_loss = linear_token_losses(copy_to_tp(h.float(), grid.tp_group), w, labels, grid.tp_group, rows.start,
                                     vocab, chunk=8, sole_use=sole_use)
    (token_loss * upstream.float()).sum().backward()
    torch.testing.assert_close(token_loss, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hidden.grad, rtol=1e-5, atol=1e-5)
    weight_grad = w.main_grad - 0.25 if sole_use else w.grad
    torch.testing.assert_close(weight_grad, weight.grad[rows].float(), rtol=1e-5, atol=1e-5)
    assert not sole_use or w.main_grad_filled
    dist.barrier()
    return True


def test_token_losses_match_plain_path_serial():
    assert run_distributed(_check_token_losses, 1, 1, False) == [True]


def test_token_losses_match_plain_path_tp2_into_main_grad():
    assert run_distributed(_check_token_losses, 2, 2, True) == [True, True]


def test_frozen_output_layer_gets_no_weight_gradient_work(one_process_group, monkeypatch):
    """LoRA freezes the output layer: both chunked paths give the hidden state's gradient of
    the plain path and run no weight-gradient GEMM."""
    from parallel import linear_cross_entropy as lce

    def no_weight_gemm(*_args):
        raise AssertionError("weight-gradient GEMM for a frozen weight")

    torch.manual_seed(3)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 8, dtype=torch.float64)  # frozen
    labels, token_weights = torch.randint(0, 10, (13,)), torch.rand(13, dtype=torch.float64)
    expected_sum, expected_loss = _reference(hidden, weight, labels, token_weights, 10)
    expected_sum.backward()
    monkeypatch.setattr(lce, "accumulate_weight_grad", no_weight_gemm)
    for loss_grad in (None, 1.0):
        h = hidden.detach().clone().requires_grad_(True)
        total, _ = lce.linear_cross_entropy(h, weight, labels, token_weights, one_process_group, 0, 10, chunk=4,
                                            sole_use=True, loss_grad=loss_grad)
        total.backward()
        torch.testing.assert_close(h.grad, hidden.grad, rtol=1e-6, atol=1e-6)
    h = hidden.detach().clone().requires_grad_(True)
    token_loss = lce.linear_token_losses(h, weight, labels, one_process_group, 0, 10, chunk=4, sole_use=True)
    (token_loss * token_weights).sum().backward()
    torch.testing.assert_close(h.grad, hidden.grad, rtol=1e-6, atol=1e-6)
    assert weight.grad is None

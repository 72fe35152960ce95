"""The chunked output-projection + cross-entropy gives the plain path's loss and gradients."""
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed


def _reference(hidden, weight, labels, token_weights, vocab_size):
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits[:, :vocab_size].float(), labels, reduction="none")
    return (loss * token_weights).sum(), loss


def _check(tp):
    import torch.distributed as dist

    from parallel.grid import build_grid, init_distributed
    from parallel.linear_cross_entropy import linear_cross_entropy
    from parallel.mappings import copy_to_tp

    init_distributed("cpu")
    grid = build_grid(tp=tp)
    torch.manual_seed(0)
    tokens, dim, padded, vocab = 37, 16, 24, 21  # 3 padding rows, odd chunking
    hidden = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    token_weights = torch.rand(tokens, dtype=torch.float64)
    expected_sum, expected_loss = _reference(hidden, weight, labels, token_weights, vocab)
    (expected_sum * 0.5).backward()

    per_rank = padded // tp
    rows = slice(grid.tp_rank * per_rank, (grid.tp_rank + 1) * per_rank)
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach()[rows].clone().requires_grad_(True)
    total, token_loss = linear_cross_entropy(copy_to_tp(h, grid.tp_group), w, labels, token_weights,
                                             grid.tp_group, rows.start, vocab, chunk=8)
    (total * 0.5).backward()
    torch.testing.assert_close(total, expected_sum.to(total.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(token_loss, expected_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, weight.grad[rows], rtol=1e-6, atol=1e-6)
    dist.barrier()
    return True


def test_matches_plain_cross_entropy_serial():
    assert run_distributed(_check, 1, 1) == [True]


def test_matches_plain_cross_entropy_vocab_parallel():
    assert run_distributed(_check, 2, 2) == [True, True]

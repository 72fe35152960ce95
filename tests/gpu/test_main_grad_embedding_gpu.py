"""The embedding-gradient kernel (csrc/embedding_backward.cu) against the fp64 sum of the
looked-up rows: spread-out ids, one id filling half or all of the micro-batch (padding), tokens
another vocabulary shard holds (skipped), a width that leaves the last column block part empty
and a token count that leaves the last row chunk part full; and the same bits on every run."""
import pytest
import torch

from csrc import loader
from parallel import main_grad_embedding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ids(kind: str, vocab: int, n: int, generator) -> torch.Tensor:
    ids = torch.randint(0, vocab, (n,), generator=generator)
    if kind == "half-padding":
        ids[n // 2:] = 0
    elif kind == "one-id":
        ids[:] = 7
    return ids


@pytest.mark.parametrize("hidden", [264, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["spread", "half-padding", "one-id", "sharded"])
def test_gradient_rows_sum_into_main_grad(kind, dtype, hidden):
    generator = torch.Generator().manual_seed(0)
    vocab, tokens = 1000, 4094  # the last 8-row chunk of the kernel part full
    ids = _ids(kind, vocab, tokens, generator).view(2, -1)
    elsewhere = (ids % 3 == 0) if kind == "sharded" else None
    ids, grad_out = ids.cuda(), torch.randn(2, tokens // 2, hidden, generator=generator).to("cuda", dtype)
    kept = ids.reshape(-1) if elsewhere is None else ids.reshape(-1)[~elsewhere.reshape(-1).cuda()]
    kept_rows = grad_out.reshape(-1, hidden) if elsewhere is None else grad_out.reshape(-1, hidden)[
        ~elsewhere.reshape(-1).cuda()]
    expected = torch.zeros(vocab, hidden, dtype=torch.float64, device="cuda").index_add_(0, kept, kept_rows.double())
    results = []
    for _ in range(2):
        weight = torch.nn.Parameter(torch.randn(vocab, hidden, device="cuda", dtype=dtype))
        weight.main_grad = torch.zeros(vocab, hidden, device="cuda")
        assert loader.embedding_grad_supported(weight.main_grad, dtype)
        mask = None if elsewhere is None else elsewhere.cuda()
        main_grad_embedding.embedding(ids, weight, True, mask).backward(grad_out)
        results.append(weight.main_grad)
    # A sum of 4096 fp32 rows (one id) drifts from the fp64 one by ~1e-4; a lost row would be ~1.
    torch.testing.assert_close(results[0].double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(results[0], results[1])  # the same bits on every run

"""Document-masked attention on CUDA (packed SFT samples, left-padded rollouts): the flex, sdpa
and (when installed) flash backends equal attending each document alone, forward and backward, in bf16; and the
layers of one forward share one mask, built again for a new batch.
Run on a CUDA machine: `python3 -m pytest tests/gpu/test_document_attention_gpu.py -q`."""
import pytest
import torch

from tests.test_attention_backends import per_document

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed(gqa: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    heads, kv_heads, seq, dim = 8, 2 if gqa else 8, 512, 64
    q = torch.randn(2, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    lengths = [[100, 200, 150, 62], [384, 128]]  # the second row: a left-padding-like split
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]).cuda()
    return q, k, v, ids


def grads(fn, q, k, v):
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*inputs)
    out.float().pow(2).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("backend", ["flex", "sdpa", "flash"])
@pytest.mark.parametrize("gqa", [False, True])
def test_document_attention_matches_documents_alone(backend, gqa):
    from models.attention import attend
    from models.flash_kernels import flash_kernels

    if backend == "flash" and flash_kernels() is None:
        pytest.skip("no flash-attn package installed")

    q, k, v, ids = packed(gqa)
    out, got = grads(lambda a, b, c: attend(a, b, c, document_ids=ids, backend=backend), q, k, v)
    ref, expected = grads(lambda a, b, c: per_document(a, b, c, ids), q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=5e-2)


def test_flex_block_mask_shared_by_the_layers_of_a_forward():
    from models import attention

    q, k, v, ids = packed(gqa=False)
    built = []
    original = attention._document_block_mask
    attention._document_block_mask = lambda d, device: built.append(1) or original(d, device)
    try:
        outs = [attention.attend(q, k, v, document_ids=ids, backend="flex") for _ in range(3)]
        assert len(built) == 1
        other = ids.clone()
        other[0] = torch.repeat_interleave(torch.arange(2), torch.tensor([256, 256])).cuda()
        moved = attention.attend(q, k, v, document_ids=other, backend="flex")
        assert len(built) == 2
    finally:
        attention._document_block_mask = original
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    torch.testing.assert_close(moved.float(), per_document(q, k, v, other).float(), rtol=2e-2, atol=2e-2)

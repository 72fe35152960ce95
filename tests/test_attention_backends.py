"""Document-masked attention over a packed sequence equals attending each document alone."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import attend, choose_backend, document_causal_mask


def _packed_inputs(gqa: bool):
    torch.manual_seed(0)
    heads, kv_heads = 4, 2 if gqa else 4
    q = torch.randn(2, heads, 12, 8)
    k, v = torch.randn(2, kv_heads, 12, 8), torch.randn(2, kv_heads, 12, 8)
    document_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    return q, k, v, document_ids


def per_document(q, k, v, document_ids):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for doc in document_ids[b].unique():
            idx = (document_ids[b] == doc).nonzero().squeeze(-1)
            out[b][:, idx] = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx],
                                                            is_causal=True, enable_gqa=k.shape[1] != q.shape[1])[0]
    return out


@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_document_mask_matches_separate_documents(gqa):
    q, k, v, document_ids = _packed_inputs(gqa)
    torch.testing.assert_close(attend(q, k, v, document_ids=document_ids, backend="sdpa"),
                               per_document(q, k, v, document_ids), rtol=1e-5, atol=1e-5)


def test_without_documents_is_plain_causal():
    q, k, v, _ = _packed_inputs(False)
    torch.testing.assert_close(attend(q, k, v, backend="auto"), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_mask_shape_and_auto_choice_on_cpu():
    ids = torch.tensor([[0, 0, 1]])
    assert document_causal_mask(ids)[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    q = torch.randn(1, 1, 3, 4)
    assert choose_backend("auto", q, ids) == "sdpa"


def test_layers_of_one_forward_share_the_document_mask():
    """Every layer gets the mask built for the first one while the same document_ids tensor is
    passed unchanged; a new tensor (even of equal values) or an in-place change builds it anew,
    and the output always equals attending each document alone."""
    from models import attention

    q, k, v, document_ids = _packed_inputs(gqa=False)
    expected = per_document(q, k, v, document_ids)
    built = []
    original = attention.document_causal_mask
    attention.document_causal_mask = lambda ids: built.append(ids.clone()) or original(ids)
    try:
        for _ in range(3):  # three layers
            torch.testing.assert_close(attend(q, k, v, document_ids=document_ids, backend="sdpa"), expected)
        assert len(built) == 1
        copy = document_ids.clone()
        torch.testing.assert_close(attend(q, k, v, document_ids=copy, backend="sdpa"), expected)
        assert len(built) == 2
        copy[1] = torch.tensor([0] * 6 + [1] * 6)  # in place: the version moves on
        torch.testing.assert_close(attend(q, k, v, document_ids=copy, backend="sdpa"), per_document(q, k, v, copy))
        assert len(built) == 3 and torch.equal(built[-1], copy)
    finally:
        attention.document_causal_mask = original

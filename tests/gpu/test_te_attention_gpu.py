"""Transformer Engine's attention backend (`model.attention_backend te`) on a GPU, on Trellis's
layout ([b, n, s, d] views of [s, b, n, d] storage): forward and backward in bf16 against an
fp32 reference, no worse than cuDNN's SDPA on the same inputs; packed documents against each
document attended alone. Skipped where transformer_engine does not import.
Run on a CUDA machine: `python3 -m pytest tests/gpu/test_te_attention_gpu.py -q`."""
import pytest
import torch

from models import te_attention
from models.attention import attend
from tests.gpu.test_flash_attention_gpu import ATTENTION_SHAPES, assert_as_close_as_cudnn, sbnd_inputs
from tests.test_attention_backends import per_document

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or te_attention.unusable_reason(torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16), 0.0) is not None,
    reason="needs a CUDA GPU and transformer_engine")


@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
def test_te_matches_fp32_and_keeps_the_layout(shape):
    q, k, v = sbnd_inputs(*shape)
    assert_as_close_as_cudnn(q, k, v, torch.randn_like(q), "te")
    out = attend(q, k, v, backend="te")
    assert out.permute(2, 0, 1, 3).is_contiguous(), "the output lost the [s, b, n, d] layout"


@pytest.mark.parametrize("gqa", [False, True])
def test_te_packed_documents_match_each_document_alone(gqa):
    b, heads, kv_heads, s, d = 2, 8, (2 if gqa else 8), 1024, 128
    q, k, v = sbnd_inputs(b, heads, kv_heads, s, d, seed=3)
    lengths = [[300, 500, 224], [1024]]
    document_ids = torch.cat([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)).unsqueeze(0)
                              for row in lengths]).cuda()
    dout = torch.randn_like(q)
    out = attend(q, k, v, document_ids=document_ids, backend="te")
    out.backward(dout)
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = per_document(*ref_inputs, document_ids)
    ref.backward(dout.float())
    for name, got, want in [("out", out, ref)] + [(n, t.grad, r.grad) for n, t, r in zip(("dq", "dk", "dv"), (q, k, v), ref_inputs)]:
        error = ((got.float() - want).norm() / want.norm()).item()
        assert error < 1e-2, (name, error)

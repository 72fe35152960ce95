"""The flash backend (FlashAttention-2 or FlashAttention-4's CuTe kernels, whichever is
installed) on Trellis's own layout: q, k, v are [b, n, s, d] views of the [s, b, n, d] tensors
the QKV-RoPE kernel writes. Forward and backward in bf16 against an fp32 reference, no worse
than cuDNN's SDPA on the same inputs, and gradients that keep the [s, b, n, d] layout (no copy).
Run on a CUDA machine: `python3 -m pytest tests/gpu/test_flash_attention_gpu.py -q`."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import attend
from models.flash_kernels import flash_kernels

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(flash_kernels() is None, reason="no flash-attn package installed")]


def sbnd_inputs(batch, heads, kv_heads, seq, dim, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = [torch.randn(seq, batch, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for n in (heads, kv_heads, kv_heads)]
    return [t.permute(1, 2, 0, 3).requires_grad_(True) for t in tensors]


def relative_errors(q, k, v, dout, backend):
    for t in (q, k, v):
        t.grad = None
    out = attend(q, k, v, backend=backend)
    out.backward(dout)
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_inputs, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    ref.backward(dout.float())
    pairs = [(out, ref)] + [(t.grad, r.grad) for t, r in zip((q, k, v), ref_inputs)]
    return [((a.float() - b).norm() / b.norm()).item() for a, b in pairs]


def assert_as_close_as_cudnn(q, k, v, dout, backend) -> list:
    """`backend`'s output and gradients within 1e-2 of fp32 and within 1.5x (+1e-3) of the errors
    of cuDNN's SDPA on the same inputs; returns the backend's gradients of q, k, v."""
    errors = relative_errors(q, k, v, dout, backend)
    grads = [t.grad for t in (q, k, v)]
    sdpa = relative_errors(q, k, v, dout, "sdpa")
    for name, got, cudnn in zip(("out", "dq", "dk", "dv"), errors, sdpa):
        assert got < 1e-2, (name, got)
        assert got < 1.5 * cudnn + 1e-3, (name, got, cudnn)
    return grads


ATTENTION_SHAPES = {"mha": (2, 8, 8, 1024, 128), "gqa": (1, 16, 4, 2048, 128), "d64-ragged": (2, 4, 4, 640, 64)}


@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
def test_flash_matches_fp32_and_keeps_the_layout(shape):
    q, k, v = sbnd_inputs(*shape)
    grads = assert_as_close_as_cudnn(q, k, v, torch.randn_like(q), "flash")
    for grad, t in zip(grads, (q, k, v)):
        assert grad.permute(2, 0, 1, 3).is_contiguous(), "the gradient lost the [s, b, n, d] layout"

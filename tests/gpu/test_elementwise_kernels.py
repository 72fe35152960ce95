"""The SwiGLU and QKV split + RoPE CUDA kernels vs their torch references, forward and
backward, on a GPU (relative errors as in test_kernels.py: 1e-2 for bf16/fp16, 1e-4 for fp32),
and the dispatch in models/fused_elementwise.py."""
import pytest
import torch

from csrc import loader
from models.fused_elementwise import fused_split_qkv_rope, fused_swiglu, split_qkv_rope_sbnd, swiglu
from models.rope import rope_cache
from tests.gpu.test_kernels import DTYPES, assert_close_rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (rows shape, f): one vector, a ragged last block (125 vectors of bf16), llama-1.3b's 5632
# (704 vectors: three blocks, the last partly idle), 3-D rows.
SWIGLU_SHAPES = [((5,), 8), ((33,), 1000), ((512,), 5632), ((2, 3, 7), 256)]
# (s, b, heads, kv_heads, head_dim): MHA, GQA, the narrowest head for bf16 (16), d = 96, and
# llama-1.3b's layout. The kernel's instances, by how a thread's 4 units split into rows x heads:
# 4 x 1 (batches of 4 and 8), 2 x 2 (batch 2, even head counts), 1 x 4 (head counts that 4
# divides), and 1 x 1 for the rest (batch 3 with 2 kv heads, 3 heads, 2/1 heads). Per-sample tables
# (explicit position ids) take the 1 x 4 and 1 x 1 instances only.
ROPE_SHAPES = [(16, 2, 4, 4, 64), (33, 3, 8, 2, 128), (7, 1, 2, 1, 16), (5, 2, 3, 1, 96), (256, 4, 16, 16, 128),
               (9, 8, 4, 2, 64), (10, 2, 8, 2, 128), (12, 1, 8, 4, 64), (5, 3, 4, 4, 16)]


@pytest.fixture(scope="module")
def ext():
    return loader.build_kernels()  # a build failure fails the tests instead of skipping them


def random(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=gen).mul_(2).to(dtype)


@pytest.mark.parametrize("rows_shape,f", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(ext, rows_shape, f, dtype):
    h = random((*rows_shape, 2 * f), dtype, 0)
    dy = random((*rows_shape, f), dtype, 1)
    y = ext.swiglu_forward(h)
    assert_close_rel(y, swiglu(h), dtype, "swiglu forward")
    h_ref = h.clone().requires_grad_()
    swiglu(h_ref).backward(dy)
    assert_close_rel(ext.swiglu_backward(h, dy), h_ref.grad, dtype, "swiglu backward")


def positions_restarting_at(starts: torch.Tensor) -> torch.Tensor:
    """Position ids [..., s] that restart at 0 wherever the bool `starts` [..., s] is set, as the
    documents of packed samples number theirs."""
    index = torch.arange(starts.shape[-1], device=starts.device).expand_as(starts)
    return index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=-1).values


def random_positions(s: int, b: int, seed: int) -> torch.Tensor:
    """[b, s] position ids that restart at random document starts."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return positions_restarting_at(torch.rand(b, s, device="cuda", generator=gen) < 0.2)


@pytest.mark.parametrize("s,b,heads,kv_heads,d", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["shared", "per-sample"])
def test_qkv_rope_matches_reference(ext, s, b, heads, kv_heads, d, dtype, tables):
    qkv = random((s, b, (heads + 2 * kv_heads) * d), dtype, 2)
    positions = random_positions(s, b, 8) if tables == "per-sample" else None
    cos, sin = rope_cache(s, d, 10000.0, "cuda", positions)
    qkv_ref = qkv.clone().requires_grad_()
    want = split_qkv_rope_sbnd(qkv_ref, cos, sin, heads, kv_heads, d)
    got = ext.qkv_rope_forward(qkv, cos, sin, heads, kv_heads)
    for name, g, w in zip("qkv", got, want):
        assert g.is_contiguous()
        assert_close_rel(g, w, dtype, f"{name} forward")
    grads = [random(t.shape, dtype, 3 + i) for i, t in enumerate(want)]
    torch.autograd.backward(want, grads)
    assert_close_rel(ext.qkv_rope_backward(*grads, cos, sin), qkv_ref.grad, dtype, "qkv backward")


def test_dispatch_uses_the_kernels_and_falls_back(ext):
    h = random((64, 2 * 256), torch.bfloat16, 4).requires_grad_()
    assert type(fused_swiglu(h).grad_fn).__name__ == "_SwiGLUBackward"
    odd = random((64, 2 * 12), torch.bfloat16, 5).requires_grad_()  # f not a multiple of 8
    assert not loader.swiglu_supported(odd)
    torch.testing.assert_close(fused_swiglu(odd), swiglu(odd))

    s, b, heads, kv_heads, d = 32, 2, 4, 2, 64
    qkv = random((s, b, (heads + 2 * kv_heads) * d), torch.bfloat16, 6).requires_grad_()
    q, k, v = fused_split_qkv_rope(qkv, rope_cache(s, d, 10000.0, "cuda"), heads, kv_heads, d)
    assert q.shape == (b, heads, s, d) and v.shape == (b, kv_heads, s, d)
    assert type(q.grad_fn.next_functions[0][0]).__name__ == "_SplitQKVRopeBackward"  # under the permutation
    per_sample = rope_cache(s, d, 10000.0, "cuda", random_positions(s, b, 9))
    assert loader.split_qkv_rope_supported(qkv, *per_sample, heads, kv_heads, d)
    q, k, v = fused_split_qkv_rope(qkv, per_sample, heads, kv_heads, d)
    assert type(q.grad_fn.next_functions[0][0]).__name__ == "_SplitQKVRopeBackward"
    want = [t.permute(1, 2, 0, 3) for t in split_qkv_rope_sbnd(qkv, *per_sample, heads, kv_heads, d)]
    for name, g, w in zip("qkv", (q, k, v), want):
        assert_close_rel(g, w, torch.bfloat16, f"{name} with per-sample tables")
    assert not loader.split_qkv_rope_supported(qkv, None, None, heads, kv_heads, d)


def test_unused_outputs_get_zero_gradients(ext):
    """Only q takes part in the loss: k and v's gradients reach the kernel as zeros."""
    s, b, heads, kv_heads, d = 8, 2, 2, 1, 32
    qkv = random((s, b, (heads + 2 * kv_heads) * d), torch.float32, 7)
    rope = rope_cache(s, d, 10000.0, "cuda")
    got_in, want_in = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    fused_split_qkv_rope(got_in, rope, heads, kv_heads, d)[0].sum().backward()
    split_qkv_rope_sbnd(want_in, *rope, heads, kv_heads, d)[0].sum().backward()
    assert_close_rel(got_in.grad, want_in.grad, torch.float32, "qkv grad with k, v unused")


def test_kernels_refuse_bad_input(ext):
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.swiglu_forward(torch.zeros(4, 2 * 12, device="cuda", dtype=torch.bfloat16))
    qkv = torch.zeros(4, 1, 3 * 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cache(5, 64, 10000.0, "cuda")  # one position too many
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        ext.qkv_rope_forward(qkv, cos, sin, 1, 1)

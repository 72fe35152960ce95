"""The decode-attention kernels (csrc/decode_attention.cu, and decode_attention_grouped.cu for
2..8 query heads a kv head) against fp32 attention on random inputs: head dims 64, 128 and 256
(64 and 128 grouped), groups of 1 to 8, bf16 and fp16, one split and several, the new slot
first, inside and last, left-padded rows, and strided q, k, v as the layers hand them over. The
cache must change in the new slot only, to exactly the new key and value, and slots past the
fill mark must not be read (they hold NaN here). Also inside a CUDA graph replayed at moving
positions. Run on a CUDA machine:
`python3 -m pytest tests/gpu/test_decode_attention_gpu.py -q`."""
import math

import pytest
import torch

from csrc import loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (batch, heads, kv heads, head dim, cache slots)
SHAPES = [(3, 8, 8, 128, 300), (2, 16, 16, 64, 520), (1, 32, 32, 128, 2100), (1, 8, 8, 256, 700), (5, 4, 4, 64, 64),
          (2, 4, 4, 256, 1000),
          # grouped: llama3-8b's 4 a kv head, 70b's 8, odd groups, one kv head, tails of a 16-key step
          (2, 32, 8, 128, 1030), (3, 16, 2, 128, 300), (2, 6, 2, 64, 77), (1, 28, 4, 128, 2100), (4, 8, 1, 64, 520),
          (2, 10, 2, 128, 33)]
BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative error against fp32


def strided(batch, heads, dim, dtype):
    """[b, n, 1, d] views of [1, b, n, d] storage (the QKV-RoPE kernel's layout)."""
    return torch.randn(1, batch, heads, dim, device="cuda", dtype=dtype).permute(1, 2, 0, 3)


def make_inputs(batch, heads, kv_heads, dim, slots, position, dtype):
    q, k, v = strided(batch, heads, dim, dtype), strided(batch, kv_heads, dim, dtype), strided(batch, kv_heads, dim, dtype)
    keys, values = (torch.randn(batch, kv_heads, slots, dim, device="cuda", dtype=dtype) for _ in range(2))
    keys[:, :, position + 1:], values[:, :, position + 1:] = float("nan"), float("nan")  # must never be read
    pad = torch.randint(0, position + 1, (batch,), device="cuda")
    pad[0] = 0
    slot = torch.arange(slots, device="cuda")
    visible = (slot >= pad[:, None]) & (slot <= position)
    return q, k, v, keys, values, visible, torch.tensor([position], device="cuda")


def attention_fp32(q, k, v, keys, values, visible, position):
    """The expected output and cache, in fp32 math from the inputs before the call."""
    keys, values = keys.clone(), values.clone()
    keys[:, :, position] = k[:, :, 0]
    values[:, :, position] = v[:, :, 0]
    group = q.shape[1] // keys.shape[1]
    kf, vf = (t.float()[:, :, :position + 1].repeat_interleave(group, dim=1) for t in (keys, values))
    scores = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None, None, :position + 1], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vf, keys, values


def relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-{}over{}heads-d{}-L{}".format(*s))
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_decode_attention_matches_fp32(shape, dtype, splits):
    batch, heads, kv_heads, dim, slots = shape
    torch.manual_seed(sum(shape) + splits)
    for position in (0, slots // 3, slots - 1):
        q, k, v, keys, values, visible, where = make_inputs(batch, heads, kv_heads, dim, slots, position, dtype)
        assert loader.decode_attention_supported(q, keys)
        expected, expected_keys, expected_values = attention_fp32(q, k, v, keys, values, visible, position)
        out = loader.kernels().decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], keys, values, visible, where,
                                                splits).unsqueeze(2)
        assert out.shape == (batch, heads, 1, dim) and out.dtype == dtype
        assert relative_error(out, expected) < BOUND[dtype], (position, relative_error(out, expected))
        torch.testing.assert_close(keys, expected_keys, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(values, expected_values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kv_heads", [16, 4])
def test_decode_attention_as_close_as_sdpa(kv_heads):
    """In bf16 the kernel is no further from fp32 than the torch reference it replaces."""
    from models.kv_cache import static_decode_attention_reference

    torch.manual_seed(0)
    q, k, v, keys, values, visible, where = make_inputs(8, 16, kv_heads, 128, 1024, 700, torch.bfloat16)
    keys[:, :, 701:], values[:, :, 701:] = 0, 0  # SDPA reads every slot (masked, but NaN would spread)
    expected, _, _ = attention_fp32(q, k, v, keys, values, visible, 700)
    reference = static_decode_attention_reference(q, k, v, keys.clone(), values.clone(), visible, where)
    out = loader.decode_attention(q, k, v, keys, values, visible, where)
    assert relative_error(out, expected) <= 1.5 * relative_error(reference, expected)


@pytest.mark.parametrize("kv_heads", [16, 4])
def test_decode_attention_in_a_cuda_graph(kv_heads):
    """Captured once, replayed as the position and mask move and new q, k, v are copied in."""
    torch.manual_seed(1)
    batch, heads, dim, slots = 4, 16, 128, 512
    q, k, v, keys, values, visible, where = make_inputs(batch, heads, kv_heads, dim, slots, 0, torch.bfloat16)
    keys.zero_(), values.zero_()
    static_q, static_k, static_v = q.clone(), k.clone(), v.clone()
    loader.decode_attention(static_q, static_k, static_v, keys, values, visible, where)  # load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loader.decode_attention(static_q, static_k, static_v, keys, values, visible, where)
    slot = torch.arange(slots, device="cuda")
    for position in (1, 2, 129, 300, slots - 1):
        step_q = strided(batch, heads, dim, torch.bfloat16)
        step_k, step_v = (strided(batch, kv_heads, dim, torch.bfloat16) for _ in range(2))
        visible.copy_((slot <= position).expand(batch, slots))
        where.fill_(position)
        expected, expected_keys, _ = attention_fp32(step_q, step_k, step_v, keys, values, visible, position)
        static_q.copy_(step_q), static_k.copy_(step_k), static_v.copy_(step_v)
        graph.replay()
        assert relative_error(out, expected) < 1e-2, position
        torch.testing.assert_close(keys, expected_keys, rtol=0, atol=0)


def test_unsupported_shapes_take_the_reference():
    q = strided(2, 32, 128, torch.bfloat16)
    keys = torch.zeros(2, 2, 16, 128, device="cuda", dtype=torch.bfloat16)
    assert not loader.decode_attention_supported(q, keys)  # 16 query heads a kv head: more than a tile's 8 rows
    q = strided(2, 8, 256, torch.bfloat16)
    assert not loader.decode_attention_supported(q, torch.zeros(2, 4, 16, 256, device="cuda", dtype=torch.bfloat16))
    q = strided(2, 4, 96, torch.bfloat16)
    assert not loader.decode_attention_supported(q, torch.zeros(2, 4, 16, 96, device="cuda", dtype=torch.bfloat16))
    q = strided(2, 4, 128, torch.float32)
    assert not loader.decode_attention_supported(q, torch.zeros(2, 4, 16, 128, device="cuda"))


def test_the_kernel_refuses_bad_shapes_with_messages():
    """Errors raise (their messages hold sizes as text: a streamed integer crashed nvcc 13 builds)."""
    ext = loader.build_kernels()
    q, k, v, keys, values, visible, position = make_inputs(2, 8, 2, 128, 64, 10, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"keys \[2, n_kv, max_len, 128\] with n_kv dividing 8 expected"):
        ext.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], keys[:, :, :, :64].contiguous(),
                             values[:, :, :, :64].contiguous(), visible, position, 0)
    q16 = strided(2, 32, 128, torch.bfloat16)
    with pytest.raises(RuntimeError, match="2..8 query heads a kv head at head_dim 64 or 128; got 16 at 128"):
        ext.decode_attention(q16[:, :, 0], k[:, :, 0], v[:, :, 0], keys, values, visible, position, 0)

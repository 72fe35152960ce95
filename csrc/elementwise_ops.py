"""Autograd functions around the SwiGLU and QKV-split + RoPE kernels of trellis_kernels, and
the calls of its embedding-gradient and AdamW kernels.

Eager only: under torch.compile the callers keep the torch code, which Inductor fuses itself.
Use the dispatchers in csrc/loader.py (swiglu, split_qkv_rope); they come here only for CUDA
tensors these kernels take.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import fused_ops

VECTOR_BYTES = 16  # the kernels move 16-byte vectors
INT32_MAX = 2**31 - 1


def _dense(t: Tensor) -> Tensor:
    """t as the kernels read it: contiguous and 16-byte aligned (a copy only when it is not)."""
    if t.is_contiguous() and t.data_ptr() % VECTOR_BYTES == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _vector_elems(dtype: torch.dtype) -> int:
    return VECTOR_BYTES // dtype.itemsize


def _rows_fit(t: Tensor) -> bool:
    """The kernels index rows (one grid row each) with 32-bit integers."""
    return t.numel() // t.shape[-1] <= INT32_MAX


def swiglu_supported(h: Tensor) -> bool:
    """h = [gate | up] on its last dim, each part a positive multiple of 8 wide."""
    if h.dtype not in fused_ops.KERNEL_DTYPES or h.dim() < 1 or h.numel() == 0:
        return False
    return h.shape[-1] % 16 == 0 and _rows_fit(h)


def qkv_rope_supported(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int, head_dim: int) -> bool:
    """qkv [s, b, (heads + 2 kv_heads) head_dim] with fp32 cos/sin [s, head_dim] (or per sample,
    [b, s, head_dim]) on its device, and head_dim a multiple of two vectors of qkv's dtype."""
    if qkv.dtype not in fused_ops.KERNEL_DTYPES or qkv.dim() != 3 or qkv.numel() == 0:
        return False
    if heads <= 0 or kv_heads <= 0 or head_dim <= 0 or not _rows_fit(qkv):
        return False
    if qkv.shape[-1] != (heads + 2 * kv_heads) * head_dim or head_dim % (2 * _vector_elems(qkv.dtype)):
        return False
    table_shapes = ((qkv.shape[0], head_dim), (qkv.shape[1], qkv.shape[0], head_dim))
    return all(t.dtype == torch.float32 and t.device == qkv.device and tuple(t.shape) in table_shapes
               for t in (cos, sin)) and cos.shape == sin.shape


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        h = _dense(h)
        ctx.save_for_backward(h)
        return fused_ops._ext().swiglu_forward(h)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return fused_ops._ext().swiglu_backward(h, _dense(dy))


class _SplitQKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, kv_heads):
        cos, sin = _dense(cos), _dense(sin)
        ctx.save_for_backward(cos, sin)
        return tuple(fused_ops._ext().qkv_rope_forward(_dense(qkv), cos, sin, heads, kv_heads))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        # An output outside the loss arrives as zeros: autograd materialises missing gradients.
        cos, sin = ctx.saved_tensors
        grads = (_dense(dq), _dense(dk), _dense(dv))
        return fused_ops._ext().qkv_rope_backward(*grads, cos, sin), None, None, None, None


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up of h = [gate | up] (caller checked swiglu_supported)."""
    return _SwiGLU.apply(h)


def split_qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int):
    """Dense q [s, b, heads, d], k and v [s, b, kv_heads, d] with RoPE on q and k (caller
    checked qkv_rope_supported)."""
    return _SplitQKVRope.apply(qkv, cos, sin, heads, kv_heads)


def embedding_grad_supported(table: Tensor, grad_dtype: torch.dtype) -> bool:
    """A dense, 16-byte aligned fp32 table whose rows are whole 16-byte vectors of the gradient's
    (a kernel) dtype."""
    return (grad_dtype in fused_ops.KERNEL_DTYPES and table.dtype == torch.float32 and table.dim() == 2
            and table.shape[1] % _vector_elems(grad_dtype) == 0 and table.is_contiguous()
            and table.data_ptr() % VECTOR_BYTES == 0)


def add_embedding_grad(table: Tensor, ids: Tensor, grad: Tensor) -> None:
    """table[ids[i]] += grad[i] on the GPU (caller checked embedding_grad_supported): the ids
    sorted, then csrc/embedding_backward.cu over the touched rows; ids < 0 are skipped."""
    sorted_ids, order = ids.sort(stable=True)
    fused_ops._ext().embedding_grad_accumulate(table, sorted_ids, order, _dense(grad))


def adamw_supported(master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, model_out) -> bool:
    """Dense, 16-byte aligned fp32 state of one length on one device, and a bf16/fp16 model_out
    like it (or None): what csrc/adamw.cu reads as 16-byte vectors."""
    states = (master, grad, exp_avg, exp_avg_sq)
    if model_out is not None and model_out.dtype not in (torch.bfloat16, torch.float16):
        return False
    tensors = states + (() if model_out is None else (model_out,))
    return (all(t.dtype == torch.float32 for t in states)
            and all(t.device == master.device and t.numel() == master.numel() and t.is_contiguous()
                    and t.data_ptr() % VECTOR_BYTES == 0 for t in tensors))

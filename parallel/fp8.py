"""FP8 linear layers on `torch._scaled_mm` (used when Transformer Engine is not installed).

Forward: activations and weights quantised to e4m3 with per-tensor scales computed from the
current amax (or from the max over a short amax history, `history > 1`, as delayed scaling
does). Backward: the output gradient in e5m2 (wider range, which gradients need), multiplied
against the e4m3 operands; Hopper's FP8 matmul accepts e5m2 x e4m3 but not e5m2 x e5m2.
Matmul accumulation and outputs are bf16/fp32; master weights stay in higher precision.
`torch._scaled_mm` wants its second operand column-major, hence the transposed copies.
"""
from __future__ import annotations

import functools

import torch

from parallel.main_grad_linear import filled_placeholder, fuses_into_main_grad

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}


def quantize(x: torch.Tensor, dtype, amax: torch.Tensor | None = None):
    """(x in fp8, inverse scale) with x ~= fp8 * inverse scale."""
    amax = x.abs().amax().float() if amax is None else amax
    scale = FP8_MAX[dtype] / amax.clamp(min=1e-12)
    fp8 = (x.float() * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return fp8, scale.reciprocal()


def quantize_with_transpose(x: torch.Tensor, dtype, amax: torch.Tensor | None = None):
    """(fp8 of the 2-D x, the same values transposed and dense, inverse scale): the backward
    GEMMs need each operand in the other layout too."""
    fp8, inverse = quantize(x, dtype, amax)
    return fp8, fp8.t().contiguous(), inverse


@functools.lru_cache(maxsize=None)
def _compiled_quantize():
    """On CUDA the amax, scale, clamp, cast and the transposed copy become one compiled
    function (a reduction, then one pass that writes both layouts); eager they are six passes
    over the tensor, more than the FP8 matmul saves. Dynamic shapes: every linear of a model
    has its own, and one compiled graph serves them all."""
    return torch.compile(quantize_with_transpose, dynamic=True)


def fast_quantize(x: torch.Tensor, dtype, amax: torch.Tensor | None = None):
    """quantize_with_transpose, compiled on CUDA."""
    if x.is_cuda:
        return _compiled_quantize()(x, dtype, amax)
    return quantize_with_transpose(x, dtype, amax)


def scaled_matmul(a, a_inv_scale, b_column_major, b_inv_scale, out_dtype):
    """a [m, k] row-major @ b [k, n] column-major in FP8 with fp32 accumulation."""
    return torch._scaled_mm(a, b_column_major, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x w^T + b with x and w in e4m3; backward with the output gradient in e5m2. Each
    operand is quantised once, in both layouts its GEMMs read (a row-major, b column-major)."""

    @staticmethod
    def forward(ctx, x, weight, bias, amax_state):
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
        x2d = x.reshape(-1, x.shape[-1])
        x8, x8_t, x_inv = fast_quantize(x2d, E4M3, amax_state.observe("x", x2d))
        w8, w8_t, w_inv = fast_quantize(weight, E4M3, amax_state.observe("w", weight))
        y = scaled_matmul(x8, x_inv, w8.t(), w_inv, out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8_t, x_inv, w8_t, w_inv)
        ctx.meta = (x.shape, x.dtype, bias is not None, amax_state)
        ctx.weight = weight
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x8_t, x_inv, w8_t, w_inv = ctx.saved_tensors
        x_shape, x_dtype, has_bias, amax_state = ctx.meta
        weight = ctx.weight
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        out_dtype = torch.float32 if g2d.dtype == torch.float32 else torch.bfloat16
        g8, g8_t, g_inv = fast_quantize(g2d, E5M2, amax_state.observe("g", g2d))
        grad_x = scaled_matmul(g8, g_inv, w8_t.t(), w_inv, out_dtype)
        grad_w = scaled_matmul(g8_t, g_inv, x8_t.t(), x_inv, torch.float32)
        if fuses_into_main_grad(weight, torch.float32):
            weight.main_grad.add_(grad_w)  # fp32 straight in: no cast to bf16 and no hook add after it
            grad_w = filled_placeholder(weight)
        else:
            grad_w = grad_w.to(weight.dtype)
        grad_b = g2d.float().sum(0).to(weight.dtype) if has_bias else None
        return grad_x.reshape(x_shape).to(x_dtype), grad_w, grad_b, None


class AmaxHistory:
    """Per-layer amax bookkeeping: scale from the max of the last `length` amaxes (1 = current)."""

    def __init__(self, length: int = 1):
        self.length, self.history = length, {}

    def observe(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The amax to scale `tensor` by; None for current scaling, which the quantisation
        computes itself (fused with it on CUDA)."""
        if self.length <= 1:
            return None
        amax = tensor.detach().abs().amax().float()
        past = self.history.get(key)
        past = amax.reshape(1) if past is None else torch.cat([past[-(self.length - 1):], amax.reshape(1)])
        self.history[key] = past
        return past.max()


def fp8_linear_fn(history: int = 1):
    """A drop-in for F.linear(x, weight, bias) computing in FP8 (for `layer.linear_fn`)."""
    amax_state = AmaxHistory(history)

    def linear(x, weight, bias=None):
        if x.shape[-1] % 16 or weight.shape[0] % 16:
            return torch.nn.functional.linear(x, weight, bias)  # FP8 GEMMs need multiples of 16
        return _FP8Linear.apply(x, weight, bias, amax_state)

    return linear


def enable_fp8(module: torch.nn.Module, history: int = 1) -> int:
    """Switch every tensor-parallel linear under `module` to FP8; returns how many. Each layer
    keeps its own amax state. The output projection to the vocabulary is a plain matmul on the
    embedding (tied or not) and stays in bf16, as Transformer Engine recipes leave it."""
    from parallel.layers import ColumnParallelLinear, RowParallelLinear

    count = 0
    for layer in module.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            layer.linear_fn = fp8_linear_fn(history)
            count += 1
    return count

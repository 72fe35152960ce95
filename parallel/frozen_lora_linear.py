"""One autograd Function for a LoRA-adapted linear over a frozen base (LoRA on 16-bit weights,
QLoRA on NF4 weights): y = x W^T (+ b) + scale * (x A^T) B^T.

Why: built from separate ops, an adapted linear makes about ten autograd nodes (the base, the
two adapter products, the views around them, the sum of the two input gradients) and as many
host launches each way. At QLoRA's micro-batch 1 the GPU waits on that host work: on an H200
the step of llama3-8b was idle most of its span. Here the forward is four launches (dequantise,
base GEMM, x A^T, and an in-place addmm that adds the update into the base product) and the
backward one node: the base's input gradient and the adapter's are summed by the adapter's
addmm into the base's, not by a separate add.

The math is the composed ops': the same products in the same dtypes, the scale applied to the
rank-r products as autograd's addmm backward applies alpha. Nothing of W's size is saved: an
NF4 base is dequantised again in the backward (memory is QLoRA's point), a 16-bit base is the
parameter itself. What is saved is what the adapter needs anyway: x and x A^T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel import nf4


def _base_weight(weight, holder, dtype):
    return weight if holder is None else nf4.dequantize(holder, dtype)


class _FrozenBaseLoRALinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, bias, holder, scale):
        x2d = x.reshape(-1, x.shape[-1])
        y = F.linear(x2d, _base_weight(weight, holder, x.dtype), bias)
        low_rank = x2d @ lora_a.t()
        y.addmm_(low_rank, lora_b.t(), alpha=scale)
        ctx.holder, ctx.scale, ctx.x_shape = holder, scale, x.shape
        ctx.save_for_backward(x2d, low_rank, lora_a, lora_b, weight)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, low_rank, lora_a, lora_b, weight = ctx.saved_tensors
        grad = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_low_rank = (grad @ lora_b).mul_(ctx.scale) if (need_x or need_a) else None
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = grad @ _base_weight(weight, ctx.holder, grad.dtype)
            grad_x.addmm_(grad_low_rank, lora_a)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = grad_low_rank.t() @ x2d
        if need_b:
            grad_b = (grad.t() @ low_rank).mul_(ctx.scale)
        return grad_x, grad_a, grad_b, None, None, None, None


def frozen_base_lora_linear(x, lora_a, lora_b, weight, bias, holder, scale: float):
    """The adapted linear's output. Exactly one of `weight` (a frozen 16-bit base) and `holder`
    (an NF4 base) is given; `bias` must need no gradient (parallel/lora.py's
    LoRALinearFn.fuses decides)."""
    return _FrozenBaseLoRALinear.apply(x, lora_a, lora_b, weight, bias, holder, scale)


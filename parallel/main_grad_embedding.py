"""The embedding lookup whose weight gradient goes straight into the weight's fp32 `main_grad`.

F.embedding's backward writes a dense gradient of the whole table (zeroed, then the looked-up
rows summed into it, in the weight's dtype), and the gradient buffer's hook then adds that table
into main_grad: two passes over vocabulary x hidden elements for a few thousand touched rows,
about 0.55-0.63 ms per micro-batch at llama-1.3b's 32000 x 2048 on an H200. Here the backward
adds the output gradient's rows into main_grad at their ids (`loader.add_embedding_grad`: on a
GPU a sort and two kernels over the touched rows, csrc/embedding_backward.cu), summed in fp32
in a fixed order. The gradient so no longer rounds to the weight's dtype before it is
accumulated, as the fused linears' does not.

Only for a weight used nowhere else in the backward (not an embedding tied to the output layer
of the same stage): a second gradient would land in the `.grad` the buffer's hook skips (see
parallel/main_grad_linear.py's placeholder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from csrc import loader
from parallel.main_grad_linear import filled_placeholder, fuses_into_main_grad


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, elsewhere):
        # Tokens another TP rank owns get no gradient here: the backward skips them (id -1).
        ctx.save_for_backward(ids if elsewhere is None else ids.masked_fill(elsewhere, -1))
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        loader.add_embedding_grad(ctx.weight.main_grad, ids, grad_out)
        return None, filled_placeholder(ctx.weight), None


def embedding(ids: torch.Tensor, weight: torch.Tensor, sole_use: bool,
              elsewhere: torch.Tensor | None = None) -> torch.Tensor:
    """F.embedding(ids, weight), its weight gradient added into weight.main_grad when it can be.
    elsewhere (optional, ids' shape): tokens whose output the caller zeroes (held by another
    vocabulary shard), so they add nothing to this table."""
    trains = weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if (trains and sole_use and fuses_into_main_grad(weight, torch.float32)
            and loader.embedding_grad_supported(weight.main_grad, weight.dtype)):
        return _EmbeddingIntoMainGrad.apply(ids, weight, elsewhere)
    return F.embedding(ids, weight)

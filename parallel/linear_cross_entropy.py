"""Output projection fused with (vocab-parallel) cross-entropy, chunked over tokens.

The plain path materialises fp32 logits for the whole micro-batch ([tokens, vocab/tp], 1 GiB
at 8k tokens x 32k vocab) and keeps the softmax for backward. Here the logits of one chunk of
tokens exist at a time: the loss and its gradient w.r.t. that chunk's logits are computed in
the forward pass and immediately turned into the gradients of the hidden states and the
weight. That is possible because the loss is a weighted sum of token losses whose weights
(loss mask / global token count) are known up front; backward only multiplies by the
incoming scalar gradient, or not even that when the caller says in the forward what it will be
(`loss_grad`, the trainer's loss scale).

Per-token losses whose gradients are known only later (DPO's and the RL objectives' sequence
log-probs) go through `linear_token_losses`: its forward keeps only the token losses, and its
backward recomputes each chunk's logits to turn the incoming per-token gradients into those of
the hidden states and the weight. One more output-layer GEMM per chunk buys the fp32 softmax
the plain path keeps for the whole micro-batch (2 GiB for 8 sequences of 2048 at 32k vocab).

The weight gradient of all chunks accumulates in fp32 inside the GEMMs; when the caller says
the weight is used nowhere else (an untied output layer), it lands in the weight's main_grad,
as the tensor-parallel linears' do (parallel/main_grad_linear.py): straight from the GEMMs when
loss_grad is known, else through an fp32 buffer that the backward scales and adds. A frozen
weight (LoRA) gets no weight-gradient GEMM at all.
"""
from __future__ import annotations

import torch

from parallel.chunk_cross_entropy import ChunkSoftmax
from parallel.main_grad_linear import (accumulate_weight_grad, compute_dtype, filled_placeholder, fp32_matmul,
                                      fuses_into_main_grad)

DEFAULT_CHUNK_TOKENS = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, group, vocab_start, vocab_size, chunk, sole_use,
                loss_grad):
        dtype = compute_dtype(hidden.device.type, hidden.dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        ctx.weight = _main_grad_weight(weight, sole_use, dtype)
        ctx.loss_grad, ctx.dtypes = loss_grad, (hidden.dtype, weight.dtype)
        # With the backward's incoming gradient known, the gradients come out final here: the
        # weight's straight into main_grad, so the backward has no fp32 buffer to scale and add.
        grad_token_weights = token_weights if loss_grad is None else token_weights * loss_grad
        final_in_main_grad = ctx.weight is not None and loss_grad is not None
        grad_weight = _weight_grad_sum(weight, final_in_main_grad, ctx.needs_input_grad[1])
        grad_hidden = torch.empty_like(h)
        token_loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _chunks(h.shape[0], chunk):
                token_loss[rows] = _chunk_backward(h, w, labels, grad_token_weights, rows, grad_hidden, grad_weight,
                                                   group, vocab_start, vocab_size)
        ctx.save_for_backward(grad_hidden, None if final_in_main_grad else grad_weight)
        return (token_loss * token_weights).sum(), token_loss

    @staticmethod
    def backward(ctx, grad_sum, _grad_token_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_sum
        if ctx.loss_grad is not None:  # the forward's gradients assumed this incoming one
            torch._assert_async(grad_sum == ctx.loss_grad, _LOSS_GRAD_MISMATCH)
            scale = None
        if ctx.weight is not None:
            if grad_weight is not None:  # summed in the forward's own buffer, still unscaled
                ctx.weight.main_grad.addcmul_(grad_weight, scale)
            grad_weight = filled_placeholder(ctx.weight)
        elif grad_weight is not None:
            grad_weight = (grad_weight if scale is None else grad_weight * scale).to(weight_dtype)
        grad_hidden = (grad_hidden if scale is None else grad_hidden * scale).to(hidden_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


_LOSS_GRAD_MISMATCH = ("linear_cross_entropy: the backward's incoming gradient differs from the loss_grad its "
                       "forward was given (the gradients were already scaled by loss_grad)")


class _LinearTokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, vocab_size, chunk, sole_use):
        dtype = compute_dtype(hidden.device.type, hidden.dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        token_loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _chunks(h.shape[0], chunk):
                token_loss[rows] = ChunkSoftmax(fp32_matmul(h[rows], w.t()), labels[rows], group, vocab_start,
                                                vocab_size).loss
        ctx.save_for_backward(h, w, labels)
        ctx.options = (group, vocab_start, vocab_size, chunk, hidden.dtype, weight.dtype)
        ctx.weight = _main_grad_weight(weight, sole_use, dtype)
        return token_loss

    @staticmethod
    def backward(ctx, grad_token_loss):
        h, w, labels = ctx.saved_tensors
        group, vocab_start, vocab_size, chunk, hidden_dtype, weight_dtype = ctx.options
        grad_hidden = torch.empty_like(h)
        grad_weight = _weight_grad_sum(ctx.weight if ctx.weight is not None else w, ctx.weight is not None,
                                       ctx.needs_input_grad[1])
        with torch.autocast(h.device.type, enabled=False):
            for rows in _chunks(h.shape[0], chunk):  # the upstream gradients weight the token losses
                _chunk_backward(h, w, labels, grad_token_loss, rows, grad_hidden, grad_weight, group, vocab_start,
                                vocab_size)
        if ctx.weight is not None:
            grad_weight = filled_placeholder(ctx.weight)
        elif grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden.to(hidden_dtype), grad_weight, None, None, None, None, None, None


def _main_grad_weight(weight, sole_use: bool, dtype: torch.dtype):
    """The weight if its gradient may go straight into its main_grad (used nowhere else, trained,
    a main_grad the GEMM can write), else None."""
    return weight if sole_use and weight.requires_grad and fuses_into_main_grad(weight, dtype) else None


def _weight_grad_sum(weight, into_main_grad: bool, needed: bool):
    """Where the chunks add the weight's gradient: its main_grad, a zeroed fp32 buffer, or None
    for a frozen weight (LoRA), which then gets no weight-gradient GEMM."""
    if into_main_grad:
        return weight.main_grad
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needed else None


def _chunks(tokens: int, chunk: int):
    return [slice(start, min(start + chunk, tokens)) for start in range(0, tokens, chunk)]


def _chunk_backward(h, w, labels, token_weights, rows, grad_hidden, grad_weight, group, vocab_start, vocab_size):
    """For the tokens `rows`: the gradient of sum(weights x loss) written into grad_hidden[rows]
    and added into grad_weight (fp32; None: not asked for); returns their token losses (fp32)."""
    softmax = ChunkSoftmax(fp32_matmul(h[rows], w.t()), labels[rows], group, vocab_start, vocab_size)
    dlogits = softmax.logit_grad(token_weights[rows], h.dtype)
    grad_hidden[rows] = dlogits @ w
    # In the compute dtype (bf16 tensor cores, fp32 accumulation inside the matmul); an fp32
    # matmul here would cost more than the rest of the output layer.
    if grad_weight is not None:
        accumulate_weight_grad(grad_weight, dlogits, h[rows])
    return softmax.loss


def linear_cross_entropy(hidden, weight, labels, token_weights, group, vocab_start: int, vocab_size: int,
                         chunk: int = DEFAULT_CHUNK_TOKENS, sole_use: bool = False, loss_grad: float | None = None):
    """(sum over tokens of weight x loss, per-token losses) for hidden [T, h], weight [v/tp, h],
    labels and token_weights [T]; `hidden` must already be the TP-replicated input (its
    gradient is this rank's partial sum, reduced by the caller's copy-to-TP mapping).
    sole_use: the weight gets no other gradient in this backward (not a tied embedding), so
    its gradient may go straight into its main_grad.
    loss_grad: the gradient the caller's backward will give the summed loss (its loss scale),
    when known now; the forward then finishes the gradients (a sole-use weight's in its
    main_grad already), and the backward checks that it is given exactly that."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, token_weights, group, vocab_start, vocab_size, chunk,
                                     sole_use, loss_grad)


def linear_token_losses(hidden, weight, labels, group, vocab_start: int, vocab_size: int,
                        chunk: int = DEFAULT_CHUNK_TOKENS, sole_use: bool = False):
    """Per-token losses [T] (fp32) for hidden [T, h] and weight [v/tp, h], with no logits kept
    between forward and backward (the backward recomputes them chunk by chunk). Same input
    contract and `sole_use` meaning as `linear_cross_entropy`."""
    return _LinearTokenLosses.apply(hidden, weight, labels, group, vocab_start, vocab_size, chunk, sole_use)

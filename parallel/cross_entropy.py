"""Cross-entropy over vocab-split logits without ever gathering the full logits.

Each rank holds logits for a contiguous slice of the (padded) vocabulary. The max, the target
logit and the sum of exponentials are reduced over TP; the gradient is softmax - one_hot on
the local slice. Vocabulary padding rows beyond `vocab_size` are excluded from the softmax.
"""
from __future__ import annotations

import torch

from parallel import comm


def valid_columns(vocab_size: int, vocab_start: int, local_vocab: int) -> int:
    """How many of this rank's vocabulary columns are real tokens (the rest is padding)."""
    return min(max(vocab_size - vocab_start, 0), local_vocab)


def local_targets(target, vocab_start: int, local_vocab: int):
    """(each target's column in this rank's slice, 0 where it is outside; mask of those outside)."""
    local_target = target - vocab_start
    outside = (local_target < 0) | (local_target >= local_vocab)
    return local_target.masked_fill(outside, 0), outside


def softmax_and_loss(logits, target, group, vocab_start: int, vocab_size: int):
    """From fp32 local logits (overwritten): (local softmax, per-token loss, the local target
    index, mask of targets outside this rank's slice). Shared by the plain and fused paths."""
    local_vocab = logits.shape[-1]
    valid = valid_columns(vocab_size, vocab_start, local_vocab)
    if valid < local_vocab:
        logits[..., valid:] = float("-inf")
    logits_max = logits.max(dim=-1).values
    comm.all_reduce(logits_max, group, op=torch.distributed.ReduceOp.MAX)
    logits.sub_(logits_max.unsqueeze(-1))
    index, outside = local_targets(target, vocab_start, local_vocab)
    index = index.unsqueeze(-1)
    target_logit = logits.gather(-1, index).squeeze(-1).masked_fill(outside, 0.0)
    comm.all_reduce(target_logit, group)
    probs = logits.exp_()
    sum_exp = probs.sum(dim=-1)
    comm.all_reduce(sum_exp, group)
    loss = sum_exp.log() - target_logit
    return probs.div_(sum_exp.unsqueeze(-1)), loss, index, outside


def subtract_one_hot(probs, index, outside):
    """softmax - one_hot(target) in place: d(loss)/d(logits) for targets on this rank."""
    return probs.scatter_add_(-1, index, -(~outside).to(probs.dtype).unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size):
        softmax, loss, index, outside = softmax_and_loss(logits.float().clone(), target, group, vocab_start, vocab_size)
        ctx.save_for_backward(softmax, index, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, outside = ctx.saved_tensors
        grad = subtract_one_hot(softmax, index, outside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, group, vocab_start: int, vocab_size: int):
    """Per-token loss (fp32) from logits [..., local_vocab] split over `group`."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, vocab_size)

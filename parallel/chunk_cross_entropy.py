"""Loss and logit gradient of one chunk of fp32 logits in three passes, for the chunked output
layer (parallel/linear_cross_entropy.py).

Done op by op (parallel/cross_entropy.py: max, subtract, exp, sum, divide, one-hot, weight,
cast) that is about nine passes over the chunk's fp32 logits (256 MiB for 2048 tokens of a
32k vocabulary), a few percent of a llama-1.3b step on an H100. Here each pass is one
function that torch.compile fuses into one kernel on CUDA: the row max; the sum of
exponentials with the target's logit; and the gradient, written straight in the compute
dtype. The TP all-reduces of the max, the sum and the target logit sit between the passes.
On CPU the same functions run eagerly.
"""
from __future__ import annotations

import torch

from parallel import comm
from parallel.compiled import for_device
from parallel.cross_entropy import local_targets, valid_columns


def _masked(logits, valid: int):
    """Vocabulary padding (columns from `valid` on) excluded from the softmax."""
    if valid == logits.shape[-1]:
        return logits
    columns = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(columns >= valid, float("-inf"))


def _row_max(logits, valid: int):
    return _masked(logits, valid).amax(dim=-1)


def _row_sums(logits, valid: int, row_max, index, outside):
    """(sum of exp(logit - max), target logit - max, 0 where the target is on another rank)."""
    shifted = _masked(logits, valid) - row_max.unsqueeze(-1)
    target = shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return shifted.exp().sum(dim=-1), target


def _logit_grad(logits, valid: int, row_max, sum_exp, index, outside, token_weights, dtype: torch.dtype):
    """token weight x (softmax - one_hot(target)) in `dtype`."""
    probs = (_masked(logits, valid) - row_max.unsqueeze(-1)).exp() / sum_exp.unsqueeze(-1)
    columns = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (columns == index.unsqueeze(-1)) & ~outside.unsqueeze(-1)
    return ((probs - one_hot.to(probs.dtype)) * token_weights.float().unsqueeze(-1)).to(dtype)


def _run(fn, logits, *args):
    return for_device(fn, logits)(logits, *args)


class ChunkSoftmax:
    """The TP-reduced softmax statistics of one chunk of local logits [tokens, vocab/tp]."""

    def __init__(self, logits, target, group, vocab_start: int, vocab_size: int):
        self.logits, self.valid = logits, valid_columns(vocab_size, vocab_start, logits.shape[-1])
        self.index, self.outside = local_targets(target, vocab_start, logits.shape[-1])
        self.row_max = _run(_row_max, logits, self.valid)
        comm.all_reduce(self.row_max, group, op=torch.distributed.ReduceOp.MAX)
        self.sum_exp, target_logit = _run(_row_sums, logits, self.valid, self.row_max, self.index, self.outside)
        comm.all_reduce(self.sum_exp, group)
        comm.all_reduce(target_logit, group)
        self.loss = self.sum_exp.log() - target_logit  # per token, fp32

    def logit_grad(self, token_weights, dtype: torch.dtype):
        """d(sum of weight x loss) / d(local logits), in `dtype`."""
        return _run(_logit_grad, self.logits, self.valid, self.row_max, self.sum_exp, self.index, self.outside,
                    token_weights, dtype)

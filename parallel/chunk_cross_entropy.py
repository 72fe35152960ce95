"""Loss and logit gradient of one chunk of fp32 logits in two passes, for the chunked output
layer (parallel/linear_cross_entropy.py).

Done op by op (parallel/cross_entropy.py: max, subtract, exp, sum, divide, one-hot, weight,
cast) that is about nine passes over the chunk's fp32 logits (256 MiB for 2048 tokens of a
32k vocabulary), a few percent of a llama-1.3b step on an H100. Here each pass is one
function that torch.compile fuses into one kernel on CUDA: the row statistics (max, sum of
exponentials, target logit) in one read of the logits, and the gradient, written straight in
the compute dtype. Under tensor parallelism each rank's sum is taken against its own max and
rescaled to the global max after the max's all-reduce, so the statistics still take one read;
the all-reduces of the max, the sum and the target logit sit between the two passes. On CPU
the same functions run eagerly.
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


def _row_stats(logits, valid: int, index, outside):
    """(row max, sum of exp(logit - row max), target logit or 0 where the target is on another
    rank), from one read of the logits."""
    masked = _masked(logits, valid)
    row_max = masked.amax(dim=-1)
    sum_exp = (masked - row_max.unsqueeze(-1)).exp().sum(dim=-1)
    target = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return row_max, sum_exp, target


def _rescaled_sums(sum_exp, local_max, global_max):
    """Each rank's sum of exponentials against the global max; 0 for a row whose columns on this
    rank are all vocabulary padding (its local max is -inf and its sum NaN)."""
    return torch.where(local_max == float("-inf"), 0.0, sum_exp * (local_max - global_max).exp())


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
        self.row_max, self.sum_exp, target_logit = _run(_row_stats, logits, self.valid, self.index, self.outside)
        if comm.group_size(group) > 1:
            local_max = self.row_max.clone()
            comm.all_reduce(self.row_max, group, op=torch.distributed.ReduceOp.MAX)
            self.sum_exp = _rescaled_sums(self.sum_exp, local_max, self.row_max)
            comm.all_reduce(self.sum_exp, group)
            comm.all_reduce(target_logit, group)
        self.loss = self.sum_exp.log() - (target_logit - self.row_max)  # per token, fp32

    def logit_grad(self, token_weights, dtype: torch.dtype):
        """d(sum of weight x loss) / d(local logits), in `dtype`."""
        return _run(_logit_grad, self.logits, self.valid, self.row_max, self.sum_exp, self.index, self.outside,
                    token_weights, dtype)

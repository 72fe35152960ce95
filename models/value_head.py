"""A scalar head on the final hidden state: a reward model's score or a critic's values.

`ScalarHead` maps the final-normed hidden state (GPTModel.forward(..., return_hidden=True)) to
one number per position, [b, s] in fp32: a reward model reads it at the last token of each
sequence, a critic at every response token.

Tensor parallelism: the normed hidden state is whole on every TP rank, so the head is
replicated and computes the same values everywhere. It reads the hidden state before the
output layer's `copy_to_tp`, whose backward sums over TP the gradients of the vocab-split
logits: a replicated consumer's gradient is already whole, and summing it would count it tp
times. Under sequence parallelism each rank scores its own slice of positions and the values
are all-gathered along the sequence (the backward keeps each rank's slice of the gradient,
unsummed); the head's parameters then see only a slice, so their gradients are summed over TP
like the norms' (`mark_sequence_parallel`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layers import mark_sequence_parallel
from parallel.mappings import gather_from_sp
from parallel.sharding import ShardSpec, attach, init_from_full

HEAD_NAME = "scalar_head"  # parameter names scalar_head.weight / .bias on the last stage


class ScalarHead(nn.Module):
    def __init__(self, hidden_size: int, tp_group, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = attach(nn.Parameter(torch.empty(1, hidden_size, device=device, dtype=dtype)),
                             ShardSpec((1, hidden_size)))
        self.bias = attach(nn.Parameter(torch.zeros(1, device=device, dtype=dtype)), ShardSpec((1,)))
        if sequence_parallel:
            for param in self.parameters():
                mark_sequence_parallel(param)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """[s (/tp under sequence parallelism), b, h] -> [b, s] fp32."""
        values = F.linear(normed, self.weight, self.bias).squeeze(-1)
        if self.sequence_parallel:
            values = gather_from_sp(values, self.tp_group, reduce_grad=False)
        return values.float().t()


def attach_scalar_head(model, seed: int) -> ScalarHead:
    """Add a ScalarHead to a last-stage GPTModel, drawn from the run seed like every parameter
    (layout-free), so its names are `scalar_head.*` in checkpoints."""
    param = next(model.parameters())
    head = ScalarHead(model.cfg.hidden_size, model.tp_group, model.sequence_parallel, param.device, param.dtype)
    init_from_full(head.weight, f"{HEAD_NAME}.weight", seed, model.cfg.init_std)
    model.add_module(HEAD_NAME, head)
    return head


def last_token_scores(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """values [b, s], last_index [b] -> the value at each row's last token [b]."""
    return values.gather(1, last_index.unsqueeze(1)).squeeze(1)

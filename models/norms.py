"""LayerNorm and RMSNorm through the fused-kernel gateway (torch reference on CPU)."""
from __future__ import annotations

import torch
from torch import nn

from csrc import loader
from parallel.layers import mark_sequence_parallel
from parallel.sharding import ShardSpec, attach


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dimension with fp32 statistics. Its parameters are
    replicated across TP; under sequence parallelism each rank normalises a sequence slice,
    so their gradients are summed over TP (see `mark_sequence_parallel`)."""

    def __init__(self, kind: str, dim: int, eps: float, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = attach(nn.Parameter(torch.ones(dim, device=device, dtype=dtype)), ShardSpec((dim,)))
        self.bias = None
        if kind == "layernorm":
            self.bias = attach(nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)), ShardSpec((dim,)))
        if sequence_parallel:
            for param in self.parameters():
                mark_sequence_parallel(param)

    def forward(self, x):
        if self.kind == "rmsnorm":
            return loader.rms_norm(x, self.weight, self.eps)
        return loader.layer_norm(x, self.weight, self.bias, self.eps)

    def with_residual(self, x):
        """(norm(x), x) for a pre-norm layer, whose x goes on as the residual stream: through the
        fused kernels the stream's gradient is then added into dx by the norm's backward."""
        return loader.norm_with_residual(x, self.weight, self.bias, self.eps, self.kind == "rmsnorm")

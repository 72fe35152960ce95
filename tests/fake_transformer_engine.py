"""A CPU stand-in for the parts of Transformer Engine that parallel/te_fp8.py calls, with TE's
calling conventions as its 2.20 source has them (read from transformer_engine/pytorch/module/
linear.py) and exact matmuls:

- `Linear(in, out, bias=False, params_dtype, device)` owns a `weight` Parameter; `forward(inp,
  is_first_microbatch)` must run inside `autocast` (the recipe is recorded per call);
- with `fuse_wgrad_accumulation` the backward writes the fp32 weight gradient into
  `weight.main_grad`, *overwriting* it on a first micro-batch and adding otherwise; where the
  weight has a `grad_added_to_main_grad` attribute it sets it and returns a placeholder gradient,
  else it returns None;
- `DotProductAttention(heads, kv_channels, num_gqa_groups, attention_dropout, qkv_format,
  attn_mask_type)`: `sbhd` takes [s, b, h, d] q, k, v and returns [s, b, h * d]; `thd` takes
  [tokens, h, d] with `cu_seqlens_q/kv` and `max_seqlen_q/kv` and returns [tokens, h * d]
  (causal within each sequence for `padding_causal`); k, v may have fewer heads (GQA);
- `is_fp8_available()` returns (bool, reason); the recipes are `Format` and
  `Float8CurrentScaling` (the only one Trellis maps to).
The real library is checked on a GPU in tests/gpu/test_te_fp8_gpu.py.
"""
from __future__ import annotations

import contextlib
import enum
import sys
import types

import torch


class Format(enum.Enum):
    E4M3 = "e4m3"
    HYBRID = "hybrid"


class _Recipe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Float8CurrentScaling(_Recipe):
    pass


class _State:
    recipe = None
    calls: list = []  # (id of the weight, is_first_microbatch, the recipe in force)


@contextlib.contextmanager
def autocast(enabled=True, recipe=None):
    previous, _State.recipe = _State.recipe, recipe if enabled else None
    try:
        yield
    finally:
        _State.recipe = previous


def is_fp8_available():
    return True, ""


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, fuse_wgrad, is_first):
        ctx.save_for_backward(inp, weight)
        ctx.fuse_wgrad, ctx.is_first = fuse_wgrad, is_first
        return inp @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        inp, weight = ctx.saved_tensors
        grad_in = grad @ weight
        wgrad = grad.reshape(-1, grad.shape[-1]).float().t() @ inp.reshape(-1, inp.shape[-1]).float()
        if not ctx.fuse_wgrad:
            return grad_in, wgrad.to(weight.dtype), None, None
        if ctx.is_first:
            weight.main_grad.copy_(wgrad)
        else:
            weight.main_grad.add_(wgrad)
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            return grad_in, torch.empty_like(weight), None, None
        return grad_in, None, None, None


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda"):
        super().__init__()
        assert not bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.fuse_wgrad_accumulation = False

    def forward(self, inp, is_first_microbatch=None):
        assert _State.recipe is not None, "te.Linear called outside autocast: it would not compute in FP8"
        _State.calls.append((id(self.weight), is_first_microbatch, _State.recipe))
        return _Matmul.apply(inp, self.weight, self.fuse_wgrad_accumulation, is_first_microbatch)


class DotProductAttention(torch.nn.Module):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal"):
        super().__init__()
        assert attention_dropout == 0.0
        self.heads, self.kv_heads = num_attention_heads, num_gqa_groups or num_attention_heads
        self.qkv_format, self.mask_type = qkv_format, attn_mask_type
        self.calls = 0

    def _causal(self, q, k, v):  # [b, h, s, d]
        assert q.shape[1] == self.heads and k.shape[1] == self.kv_heads
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward(self, query_layer, key_layer, value_layer, cu_seqlens_q=None, cu_seqlens_kv=None,
                max_seqlen_q=None, max_seqlen_kv=None):
        self.calls += 1
        if self.qkv_format == "sbhd":
            assert self.mask_type == "causal" and cu_seqlens_q is None
            out = self._causal(*(t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer)))
            return out.permute(2, 0, 1, 3).reshape(*query_layer.shape[:2], -1)
        assert self.qkv_format == "thd" and self.mask_type == "padding_causal"
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_kv)
        bounds = cu_seqlens_q.tolist()
        assert bounds[-1] == query_layer.shape[0] and max(b - a for a, b in zip(bounds, bounds[1:])) == max_seqlen_q
        pieces = [self._causal(*(t[a:b].transpose(0, 1).unsqueeze(0) for t in (query_layer, key_layer, value_layer)))
                  for a, b in zip(bounds, bounds[1:])]
        return torch.cat([p.squeeze(0).transpose(0, 1) for p in pieces]).reshape(query_layer.shape[0], -1)


def install() -> None:
    """Make `import transformer_engine.pytorch` and `.common.recipe` find this stand-in."""
    root, pytorch, common, recipe = (types.ModuleType(name) for name in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
        "transformer_engine.common.recipe"))
    for name in ("Linear", "DotProductAttention", "autocast", "is_fp8_available"):
        setattr(pytorch, name, globals()[name])
    for name in ("Format", "Float8CurrentScaling"):
        setattr(recipe, name, globals()[name])
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    sys.modules.update({"transformer_engine": root, "transformer_engine.pytorch": pytorch,
                        "transformer_engine.common": common, "transformer_engine.common.recipe": recipe})

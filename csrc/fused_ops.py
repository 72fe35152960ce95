"""Autograd-aware torch ops around the trellis_kernels CUDA extension.

Two doors to the same kernels:
- eager mode: small `torch.autograd.Function`s that call the extension directly (a custom
  op's Python dispatch costs several times more CPU time per call);
- under torch.compile: torch custom ops (`torch.ops.trellis.*`) with fake (shape)
  implementations and autograd formulas, so each op is one opaque graph node, no graph break.
`torch.compiler.is_compiling()` picks the door; both call the `_*_impl` functions below.

Use the dispatchers in csrc/loader.py (rms_norm, layer_norm, scaled_masked_softmax); they
call into this module only for CUDA tensors the kernels support, and fall back otherwise.
"""
# No `from __future__ import annotations`: custom_op reads the real annotation objects.
from typing import Optional

import torch
from torch import Tensor

from .loader import kernels

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Mirrors max_norm_hidden() / max_softmax_keys() in trellis_kernels.h (a GPU test checks).
MAX_NORM_HIDDEN = 16384
MAX_SOFTMAX_KEYS = 16384
# Rows are moved in 16-byte vectors and mask rows in 8-byte words.
SIZE_MULTIPLE = 8


def _ext():
    module = kernels()
    if module is None:
        raise RuntimeError("trellis CUDA kernels are not available (disabled, no GPU, or the build failed)")
    return module


# ----------------------------------------------------------------------------- support checks


def norm_supported(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether the fused norm takes these tensors (else use the reference)."""
    if x.dim() < 1 or x.numel() == 0 or x.dtype not in KERNEL_DTYPES:
        return False
    hidden = x.shape[-1]
    if hidden % SIZE_MULTIPLE or hidden > MAX_NORM_HIDDEN:
        return False
    params = [weight] if bias is None else [weight, bias]
    return all(p.shape == (hidden,) and p.device == x.device and p.is_floating_point() for p in params)


def softmax_supported(scores: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether the fused softmax takes these tensors (else use the reference)."""
    if scores.dim() != 4 or scores.numel() == 0 or scores.dtype not in KERNEL_DTYPES:
        return False
    keys = scores.shape[-1]
    if keys % SIZE_MULTIPLE or keys > MAX_SOFTMAX_KEYS:
        return False
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.device != scores.device or mask.dim() > 4:
        return False
    # The mask must broadcast to the scores without growing them (right-aligned dims).
    mask_shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return all(m in (1, s) for m, s in zip(mask_shape, scores.shape))


def _kernel_params(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The kernels take weight (and bias) in x's dtype or fp32. The reference computes in
    fp32 anyway, so casting anything else to fp32 keeps the op's meaning; autograd carries
    the gradient back to the original dtype."""
    same = weight.dtype in (x.dtype, torch.float32) and (bias is None or bias.dtype == weight.dtype)
    if same:
        return weight, bias
    return weight.float(), None if bias is None else bias.float()


def _kernel_mask(mask: Optional[Tensor], shape) -> Optional[Tensor]:
    """The mask as a [b, h, sq, sk] view the kernel can read: contiguous along keys, strides
    (0 for broadcast dims) and address multiples of 8 bytes. Copies only when it must."""
    if mask is None:
        return None
    for candidate in (lambda: mask.expand(shape), lambda: mask.contiguous().expand(shape)):
        view = candidate()
        if view.stride(3) == 1 and all(s % 8 == 0 for s in view.stride()[:3]) and view.data_ptr() % 8 == 0:
            return view
    return mask.expand(shape).contiguous()


# ----------------------------------------------------------------------------- shared bodies


def _norm_forward_impl(x, weight, bias, eps, rms):
    return _ext().norm_forward(x.contiguous(), weight.contiguous(),
                               None if bias is None else bias.contiguous(), eps, rms)


def _norm_backward_impl(dy, x, weight, mean, rstd, has_bias, rms, need_weight_grad, dresidual):
    return _ext().norm_backward(dy.contiguous(), x.contiguous(), weight.contiguous(), mean, rstd,
                                has_bias, rms, need_weight_grad, None if dresidual is None else dresidual.contiguous())


def _softmax_forward_impl(scores, mask, scale, causal):
    return _ext().softmax_forward(scores.contiguous(), _kernel_mask(mask, scores.shape), scale, causal)


def _softmax_backward_impl(dy, y, scale, causal):
    return _ext().softmax_backward(dy.contiguous(), y.contiguous(), scale, causal)


def _norm_setup_context(ctx, inputs, output):
    """What every norm door keeps for the backward: inputs (x, weight, bias, eps, rms) and the
    forward's output (y, mean, rstd)."""
    x, weight, bias, _eps, rms = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.rms = bias is not None, rms


def _norm_grads(backward, ctx, dy, x, weight, mean, rstd, dresidual=None):
    """(dx, dweight or None, dbias or None) from `backward` (the impl in eager mode, the
    custom op when the graph may be traced), computing weight grads only when wanted;
    dresidual (optional) is added into dx."""
    want_weight = ctx.needs_input_grad[1]
    want_bias = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = backward(dy, x, weight, mean, rstd, ctx.has_bias, ctx.rms, want_weight or want_bias, dresidual)
    return dx, dw if want_weight else None, db if want_bias else None


# ----------------------------------------------------------------------------- eager autograd


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        output = _norm_forward_impl(x, weight, bias, eps, rms)
        _norm_setup_context(ctx, (x, weight, bias, eps, rms), output)
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        return (*_norm_grads(_norm_backward_impl, ctx, dy, *ctx.saved_tensors), None, None)


class _FusedNormWithResidual(torch.autograd.Function):
    """(norm(x), x) for a pre-norm layer, whose x goes on past the norm as the residual stream.
    Returning that x from here brings its gradient to this backward, which the kernel adds
    into dx: autograd would otherwise sum the two gradients of x in a pass of its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        output = _norm_forward_impl(x, weight, bias, eps, rms)
        _norm_setup_context(ctx, (x, weight, bias, eps, rms), output)
        ctx.set_materialize_grads(False)
        return output[0], x.view_as(x)

    @staticmethod
    def backward(ctx, dy, dresidual):
        if dy is None:  # only the residual stream reached the loss
            return dresidual, None, None, None, None
        return (*_norm_grads(_norm_backward_impl, ctx, dy, *ctx.saved_tensors, dresidual), None, None)


class _FusedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale, causal):
        y = _softmax_forward_impl(scores, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale, ctx.causal = scale, causal
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _softmax_backward_impl(dy, y, ctx.scale, ctx.causal), None, None, None


# ----------------------------------------------------------------------------- custom ops
# Registered for every device: the dispatchers only send CUDA tensors here, and the CPU
# tests run these ops against an emulation of the extension.


@torch.library.custom_op("trellis::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd); mean is empty for RMSNorm. mean/rstd are fp32 per row."""
    y, mean, rstd = _norm_forward_impl(x, weight, bias, eps, rms)
    return y, mean, rstd


@norm_fwd.register_fake
def _norm_fwd_fake(x, weight, bias, eps, rms):
    rows = x.numel() // x.shape[-1]
    stats = dict(dtype=torch.float32, device=x.device)
    mean = torch.empty((0,) if rms else (rows,), **stats)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), mean, torch.empty((rows,), **stats)


@torch.library.custom_op("trellis::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, has_bias: bool, rms: bool,
             need_weight_grad: bool, dresidual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dweight/dbias are empty when not asked for; dresidual
    (optional) is added into dx."""
    dx, dw, db = _norm_backward_impl(dy, x, weight, mean, rstd, has_bias, rms, need_weight_grad, dresidual)
    return dx, dw, db


@norm_bwd.register_fake
def _norm_bwd_fake(dy, x, weight, mean, rstd, has_bias, rms, need_weight_grad, dresidual=None):
    def weight_like(wanted):
        return torch.empty(weight.shape if wanted else (0,), dtype=weight.dtype, device=weight.device)

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, weight_like(need_weight_grad), weight_like(need_weight_grad and has_bias)


def _norm_op_backward(ctx, dy, _grad_mean, _grad_rstd):
    return (*_norm_grads(norm_bwd, ctx, dy, *ctx.saved_tensors), None, None)


norm_fwd.register_autograd(_norm_op_backward, setup_context=_norm_setup_context)


@torch.library.custom_op("trellis::softmax_fwd", mutates_args=())
def softmax_fwd(scores: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """softmax(scale * scores) with mask (True = masked out) and/or causal masking."""
    return _softmax_forward_impl(scores, mask, scale, causal)


@softmax_fwd.register_fake
def _softmax_fwd_fake(scores, mask, scale, causal):
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


@torch.library.custom_op("trellis::softmax_bwd", mutates_args=())
def softmax_bwd(dy: Tensor, y: Tensor, scale: float, causal: bool) -> Tensor:
    """Gradient of the scores from the saved probabilities y."""
    return _softmax_backward_impl(dy, y, scale, causal)


@softmax_bwd.register_fake
def _softmax_bwd_fake(dy, y, scale, causal):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _softmax_setup_context(ctx, inputs, output):
    _scores, _mask, scale, causal = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.causal = scale, causal


def _softmax_op_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_bwd(dy, y, ctx.scale, ctx.causal), None, None, None


softmax_fwd.register_autograd(_softmax_op_backward, setup_context=_softmax_setup_context)


# ----------------------------------------------------------------------------- entry points


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused RMSNorm (caller checked norm_supported)."""
    weight, _ = _kernel_params(x, weight, None)
    if torch.compiler.is_compiling():
        return norm_fwd(x, weight, None, float(eps), True)[0]
    return _FusedNorm.apply(x, weight, None, float(eps), True)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    """Fused LayerNorm (caller checked norm_supported)."""
    weight, bias = _kernel_params(x, weight, bias)
    if torch.compiler.is_compiling():
        return norm_fwd(x, weight, bias, float(eps), False)[0]
    return _FusedNorm.apply(x, weight, bias, float(eps), False)


def norm_with_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool):
    """(fused RMSNorm or LayerNorm of x, x as the residual stream) (caller checked
    norm_supported). Only an x that needs a gradient has two gradients to sum; otherwise (a
    frozen embedding below) x is returned as it is, so no gradient is made for it. Under
    torch.compile the custom op takes only the norm: a custom op may not return its input, and
    Inductor fuses the gradient sum itself."""
    weight, bias = _kernel_params(x, weight, bias)
    if torch.compiler.is_compiling():
        return norm_fwd(x, weight, bias, float(eps), rms)[0], x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _FusedNorm.apply(x, weight, bias, float(eps), rms), x
    return _FusedNormWithResidual.apply(x, weight, bias, float(eps), rms)


def scaled_masked_softmax(scores: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """Fused scale + mask + softmax (caller checked softmax_supported)."""
    if torch.compiler.is_compiling():
        return softmax_fwd(scores, mask, float(scale), bool(causal))
    return _FusedSoftmax.apply(scores, mask, float(scale), bool(causal))

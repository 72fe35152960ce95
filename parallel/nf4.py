"""NF4 (4-bit NormalFloat) frozen base weights for QLoRA.

Format (Dettmers et al., "QLoRA", 2023):
* The weight shard is flattened (row-major) and cut into blocks of 64 values; the tail is
  zero-padded to a whole block. Each block stores its absmax as an fp32 scale.
* Every value becomes the index of the nearest of the 16 NF4 code values after dividing by its
  block's absmax; two 4-bit indices share one uint8 (even element in the low nibble).
* Double quantisation (optional) stores the per-block absmaxes themselves in 8 bits: the mean
  over the tensor is subtracted (absmaxes are all positive; centring them makes symmetric
  quantisation use both signs), then blocks of 256 centred scales are quantised linearly to
  int8 with one fp32 scale per block. The paper uses an 8-bit float map here; linear int8
  gives the same storage and a simple, provable error bound (half a step per scale).

Memory per weight: 0.5 byte of codes + 4/64 = 0.0625 byte of fp32 scales = 0.5625 byte; with
double quantisation 0.5 + 1/64 + 4/(64*256) = 0.5159 byte (plus 4 bytes for the mean).

Dequantisation: value = code[index] * absmax (one fp32 multiply, then a cast to the compute
dtype). On a GPU one kernel (csrc/nf4_dequantize.cu) does it all, the double-quantised scales
included, with the same fp32 operations in the same order as the torch path here, so the two
agree bit for bit.
"""
from __future__ import annotations

import fnmatch
import functools

import torch
from torch import nn

from csrc import loader

BLOCK_SIZE = 64           # weights per absmax scale
SCALE_BLOCK_SIZE = 256    # absmax scales per second-level scale (double quantisation)

# The 16 NormalFloat-4 values as published with QLoRA (bitsandbytes' NF4 map): quantiles of
# N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@functools.lru_cache(maxsize=None)
def _code_book_on(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def code_book(device=None) -> torch.Tensor:
    """The 16 code values as fp32 on `device` (cached: the dequantise path runs every step;
    callers must not modify it)."""
    return _code_book_on(torch.device(device if device is not None else "cpu"))


# ----------------------------------------------------------------------------- codes + packing

def nearest_code(normalised: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest NF4 value for values in [-1, 1]. Bucketising against the
    15 midpoints between neighbouring codes is the nearest-value rule without a 16-way search."""
    codes = code_book(normalised.device)
    midpoints = (codes[1:] + codes[:-1]) / 2
    return torch.bucketize(normalised, midpoints).to(torch.uint8)


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """[n] uint8 values < 16 (n even) -> [n/2] uint8: element 2i in the low nibble."""
    pairs = indices.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)


# ----------------------------------------------------------------------------- scales

def quantize_scales(absmax: torch.Tensor):
    """fp32 absmaxes -> (int8 codes, fp32 scale per 256-block, fp32 mean). Dequantised scale =
    code * block_scale + mean; the error is at most half a step (block_scale / 2)."""
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-centred.numel()) % SCALE_BLOCK_SIZE
    blocks = torch.cat([centred, centred.new_zeros(pad)]).view(-1, SCALE_BLOCK_SIZE)
    # A block of identical scales has absmax 0: any positive step represents it exactly.
    step = (blocks.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(blocks / step[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:absmax.numel()], step, mean


def dequantize_scales(codes: torch.Tensor, step: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    block_step = step.repeat_interleave(SCALE_BLOCK_SIZE)[:codes.numel()]
    return codes.float() * block_step + mean


# ----------------------------------------------------------------------------- the holder

class NF4Weight(nn.Module):
    """A frozen weight (a TP-local shard) in NF4. The tensors are non-persistent buffers, so they
    follow `module.to(device)` but stay out of `state_dict()`: the base is re-quantised from its
    full-precision checkpoint at load time, and a QLoRA checkpoint holds the adapters only."""

    def __init__(self, weight: torch.Tensor, double_quant: bool = True):
        super().__init__()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        self.numel, self.double_quant = weight.numel(), double_quant
        flat = weight.detach().float().reshape(-1)
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % BLOCK_SIZE)])
        blocks = flat.view(-1, BLOCK_SIZE)
        absmax = blocks.abs().amax(dim=1)
        # An all-zero block divides by 1 instead of 0; its codes are then the exact zero code.
        normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
        self.register_buffer("packed", pack_nibbles(nearest_code(normalised).reshape(-1)), persistent=False)
        if double_quant:
            codes, step, mean = quantize_scales(absmax)
            self.register_buffer("absmax_codes", codes, persistent=False)
            self.register_buffer("absmax_step", step, persistent=False)
            self.register_buffer("absmax_mean", mean, persistent=False)
        else:
            self.register_buffer("absmax", absmax, persistent=False)

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per 64-block (dequantised first under double quantisation)."""
        if self.double_quant:
            return dequantize_scales(self.absmax_codes, self.absmax_step, self.absmax_mean)
        return self.absmax

    def nbytes(self) -> int:
        """Bytes this holder keeps on the device (codes + all scale tensors)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, double_quant={self.double_quant}"


def dequantize_torch(holder: NF4Weight, dtype=None) -> torch.Tensor:
    """The reference dequantisation (any device): [shape] in `dtype` (default: the original)."""
    codes = code_book(holder.packed.device)[unpack_nibbles(holder.packed).long()]
    values = codes.view(-1, BLOCK_SIZE) * holder.block_absmax()[:, None]
    return values.reshape(-1)[:holder.numel].view(holder.shape).to(dtype or holder.dtype)


def dequantize(holder: NF4Weight, dtype=None) -> torch.Tensor:
    """One CUDA kernel launch where the compiled kernels run, torch ops otherwise; bit-identical.
    It runs for every NF4 linear in the forward, the recomputed forward and the backward, so
    at QLoRA's small micro-batches its host time counts as much as its device time."""
    dtype = dtype or holder.dtype
    if not loader.nf4_dequantize_supported(holder.packed, dtype):
        return dequantize_torch(holder, dtype)
    out = torch.empty(holder.shape, dtype=dtype, device=holder.packed.device)
    if holder.double_quant:
        scales = dict(absmax_codes=holder.absmax_codes, absmax_step=holder.absmax_step,
                      absmax_mean=holder.absmax_mean)
    else:
        scales = dict(absmax=holder.absmax)
    loader.nf4_dequantize(out, holder.packed, _code_book_on(holder.packed.device), **scales)
    return out


# ----------------------------------------------------------------------------- the linear

class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly. Nothing of W's size is saved for backward:
    it is dequantised again there (memory is the point of QLoRA). W is frozen, so there is no
    weight gradient and x need not be saved either."""

    @staticmethod
    def forward(ctx, x, bias, holder):
        ctx.holder, ctx.has_bias = holder, bias is not None
        return torch.nn.functional.linear(x, dequantize(holder, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ dequantize(ctx.holder, grad_out.dtype)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class NF4LinearFn:
    """A drop-in for `layer.linear_fn(x, weight, bias)` whose weight lives in `holder`. The
    layer's `weight` is None after `enable_nf4`, so the argument is checked and ignored."""

    def __init__(self, holder: NF4Weight):
        self.holder = holder

    def __call__(self, x, weight, bias=None):
        if weight is not None:
            raise ValueError("NF4 linear: the layer still has a full-precision weight; use enable_nf4")
        return _NF4Linear.apply(x, bias, self.holder)


def _targeted(name: str, targets) -> bool:
    return targets is None or any(fnmatch.fnmatch(name, pattern) for pattern in targets)


@torch.no_grad()
def enable_nf4(module: nn.Module, targets=None, double_quant: bool = True) -> int:
    """Quantise the weight of every ColumnParallelLinear/RowParallelLinear under `module` whose
    qualified name matches one of the fnmatch `targets` (all when None); returns how many.

    Each layer's `weight` parameter is replaced by None (the full-precision tensor is freed), and
    the NF4 data lives in a child module `layer.nf4`. So `named_parameters()`, the optimizer and
    parameter checkpoints no longer see the base weight at all; the bias (if any) stays a normal
    parameter. Call it after loading the base weights and before building the optimizer."""
    from parallel.layers import ColumnParallelLinear, RowParallelLinear

    layers = [(name, layer) for name, layer in module.named_modules()
              if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) and _targeted(name, targets)]
    for _, layer in layers:
        if layer.weight is None:
            continue  # already quantised
        layer.nf4 = NF4Weight(layer.weight, double_quant)
        layer.nf4.shard_spec = layer.weight.shard_spec  # keeps the layout known for conversion/merging
        layer.register_parameter("weight", None)
        layer.linear_fn = NF4LinearFn(layer.nf4)
    return len(layers)

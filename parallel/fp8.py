"""Trellis's own FP8 linear layers on `torch._scaled_mm`: `train.fp8_backend trellis`, and what
`auto` takes where Transformer Engine is not installed or cannot run the run (parallel/te_fp8.py).

A recipe (`FP8Recipe`, from `train.fp8_format`, `train.fp8_scaling`, `train.fp8_amax_history`):
- Formats: `hybrid` quantises activations and weights to e4m3 and output gradients to e5m2
  (wider range, which gradients need; Hopper multiplies e5m2 by e4m3 but not e5m2 by e5m2);
  `e4m3` uses e4m3 for the gradients too (more precision, less range).
- Scaling: `tensor` gives each tensor one scale, from its current amax or from the max over
  an amax history; `row` gives each row of each GEMM operand its own scale (an outlier then
  costs only its row precision), computed each step.
Matmuls accumulate in fp32 and write bf16/fp32; master weights stay in higher precision.
`torch._scaled_mm` wants its second operand column-major: each operand is quantised once in
both layouts its GEMMs read. With row scaling each layout has its own scales, since a GEMM
can only scale along its outer dimensions.
"""
from __future__ import annotations

import dataclasses
import functools
import torch
from torch.utils.weak import WeakIdKeyDictionary

from csrc import loader
from parallel.main_grad_linear import filled_placeholder, fuses_into_main_grad

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}


def quantize(x: torch.Tensor, dtype, amax: torch.Tensor | None = None):
    """(x in fp8, inverse scale) with x ~= fp8 * inverse scale."""
    amax = x.abs().amax().float() if amax is None else amax
    scale = FP8_MAX[dtype] / amax.clamp(min=1e-12)
    fp8 = (x.float() * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return fp8, scale.reciprocal()


def quantize_rows(x: torch.Tensor, dtype):
    """(fp8 of the 2-D x, inverse scales [rows, 1]): one scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = FP8_MAX[dtype] / amax.clamp(min=1e-12)
    return (x.float() * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale.reciprocal()


def quantize_both_layouts(x: torch.Tensor, dtype, amax: torch.Tensor | None = None, rowwise: bool = False):
    """(fp8 x, its inverse scale, fp8 x^T dense, its inverse scale) of the 2-D x: the backward
    GEMMs need each operand in the other layout too. Row scaling scales the rows of each layout
    (so the columns of x for the transpose); tensor scaling shares one scale."""
    if rowwise:
        fp8, inverse = quantize_rows(x, dtype)
        fp8_t, inverse_t = quantize_rows(x.t(), dtype)
        return fp8, inverse, fp8_t.contiguous(), inverse_t
    fp8, inverse = quantize(x, dtype, amax)
    return fp8, inverse, fp8.t().contiguous(), inverse


@functools.lru_cache(maxsize=None)
def _compiled_quantize():
    """On CUDA the amax, scale, clamp, cast and the transposed copy become one compiled
    function (a reduction, then one pass that writes both layouts); eager they are six passes
    over the tensor, more than the FP8 matmul saves. Dynamic shapes: every linear of a model
    has its own, and one compiled graph serves them all."""
    return torch.compile(quantize_both_layouts, dynamic=True)


def fast_quantize(x: torch.Tensor, dtype, amax: torch.Tensor | None = None, rowwise: bool = False):
    """quantize_both_layouts on CUDA: tensor scaling by the cast-transpose kernel of csrc/ (an
    amax pass, then one pass writing both layouts), otherwise compiled."""
    x = x.detach()  # one compiled variant for weights and activations (requires_grad is guarded on)
    if not x.is_cuda:
        return quantize_both_layouts(x, dtype, amax, rowwise)
    if not rowwise and loader.fp8_cast_supported(x):
        return loader.fp8_cast_both_layouts(x, dtype, amax)
    return _compiled_quantize()(x, dtype, amax, rowwise)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as float32, outside autograd (by the kernel where it takes x)."""
    if loader.fp8_cast_supported(x):
        return loader.fp8_amax(x).reshape(())
    return x.detach().abs().amax().float()


# The FP8 copies of each trained weight, made once per optimizer step (a step of 8
# micro-batches quantises its weights once instead of 8 times, for 2 bytes per weight held):
# weight -> (its version counter, the copies). The optimizer wrapper clears it as each step
# begins (engine/optimizer.py), before the update and the parameter gather after it: a
# data-parallel gather rewrites weights without bumping their version. The version check
# catches other in-place writes (a checkpoint load). On CUDA only on the default stream: graph
# warm-up and capture run on side streams, and a capture must quantise inside the graph.
_weight_copies = WeakIdKeyDictionary()
CACHE_WEIGHTS = True  # False quantises weights on every call (a test compares the two)
_generation = 0  # how many times the copies were dropped: Transformer Engine's linears key their own by it


def clear_weight_cache() -> None:
    """Drop the FP8 weight copies: the weights have changed (or are about to)."""
    global _generation
    _weight_copies.clear()
    _generation += 1


def weight_generation() -> int:
    """Changes whenever clear_weight_cache runs (each optimizer step)."""
    return _generation


def may_cache(weight: torch.Tensor) -> bool:
    """Trained weights only: a frozen model's copies (DPO's reference) would stay alive through
    the policy's backward for nothing, since it runs once per micro-batch anyway."""
    if not CACHE_WEIGHTS or torch.compiler.is_compiling() or not weight.requires_grad:
        return False
    return not weight.is_cuda or torch.cuda.current_stream(weight.device) == torch.cuda.default_stream(weight.device)


def quantized_weight(weight: torch.Tensor, recipe: "FP8Recipe", amax_state: "AmaxHistory"):
    """fast_quantize of the weight in e4m3, from the per-step cache where it may be used."""
    if not may_cache(weight):
        return fast_quantize(weight, E4M3, amax_state.observe("w", weight), recipe.rowwise)
    version = weight._version
    entry = _weight_copies.get(weight)
    if entry is None or entry[0] != version:
        entry = (version, fast_quantize(weight, E4M3, amax_state.observe("w", weight), recipe.rowwise))
        _weight_copies[weight] = entry
    return entry[1]


def scaled_matmul(a, a_inv_scale, b_column_major, b_inv_scale, out_dtype):
    """a [m, k] row-major @ b [k, n] column-major in FP8 with fp32 accumulation. Scales are
    scalars, or a's [m, 1] and b's [n, 1] (its rows before the transpose) for row scaling."""
    if b_inv_scale.dim() == 2:
        b_inv_scale = b_inv_scale.reshape(1, -1)
    return torch._scaled_mm(a, b_column_major, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype)


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    grad_dtype: torch.dtype = E5M2
    rowwise: bool = False
    amax_history: int = 1  # tensor scaling: scale from the max of the last N amaxes (1 = current)

    @classmethod
    def from_names(cls, fp8_format: str = "hybrid", scaling: str = "tensor", amax_history: int = 1) -> "FP8Recipe":
        return cls(E4M3 if fp8_format == "e4m3" else E5M2, scaling == "row", amax_history)


class _FP8Linear(torch.autograd.Function):
    """y = x w^T + b with x and w in e4m3; backward with the output gradient in the recipe's
    gradient format."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, amax_state):
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
        x2d = x.reshape(-1, x.shape[-1])
        x8, x_inv, x8_t, xt_inv = fast_quantize(x2d, E4M3, amax_state.observe("x", x2d), recipe.rowwise)
        w8, w_inv, w8_t, wt_inv = quantized_weight(weight, recipe, amax_state)
        y = scaled_matmul(x8, x_inv, w8.t(), w_inv, out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8_t, xt_inv, w8_t, wt_inv)
        ctx.meta = (x.shape, x.dtype, bias is not None, recipe, amax_state)
        ctx.weight = weight
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x8_t, xt_inv, w8_t, wt_inv = ctx.saved_tensors
        x_shape, x_dtype, has_bias, recipe, amax_state = ctx.meta
        weight = ctx.weight
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        out_dtype = torch.float32 if g2d.dtype == torch.float32 else torch.bfloat16
        g8, g_inv, g8_t, gt_inv = fast_quantize(g2d, recipe.grad_dtype, amax_state.observe("g", g2d), recipe.rowwise)
        grad_x = scaled_matmul(g8, g_inv, w8_t.t(), wt_inv, out_dtype)
        grad_w = _weight_grad(weight, g8_t, gt_inv, x8_t, xt_inv, recipe)
        grad_b = g2d.float().sum(0).to(weight.dtype) if has_bias else None
        return grad_x.reshape(x_shape).to(x_dtype), grad_w, grad_b, None, None


def _weight_grad(weight, g8_t, g_inv, x8_t, x_inv, recipe: FP8Recipe) -> torch.Tensor:
    """The weight gradient g^T x from the transposed FP8 copies ([out, tokens], [in, tokens]).
    Into fp32 main_grad where there is one: with tensor scaling by the cuBLASLt GEMM that adds
    into it in its epilogue (csrc/fp8_gemm.cu), else a product and an add. Returns what
    autograd gets: the placeholder once main_grad holds it, else the gradient in the weight's dtype."""
    into_main_grad = fuses_into_main_grad(weight, torch.float32)
    if into_main_grad and not recipe.rowwise and loader.fp8_gemm_accumulate_supported(weight.main_grad):
        loader.fp8_gemm_accumulate(g8_t, g_inv, x8_t, x_inv, weight.main_grad)
        return filled_placeholder(weight)
    # The gradient is always the first operand: torch's row-scaled CUDA GEMM takes e5m2 there
    # (the second must be e4m3) and writes bf16; the tensor-scaled one writes fp32 directly.
    grad_w = scaled_matmul(g8_t, g_inv, x8_t.t(), x_inv, torch.bfloat16 if recipe.rowwise else torch.float32)
    if into_main_grad:
        weight.main_grad.add_(grad_w)  # no cast to the weight's dtype and no hook add after it
        return filled_placeholder(weight)
    return grad_w.to(weight.dtype)


class AmaxHistory:
    """Per-layer amax bookkeeping: scale from the max of the last `length` amaxes (1 = current).
    The history is a fixed tensor updated in place, so a CUDA graph replay updates it too. It
    is training state: checkpoints keep it (engine/checkpoint.py), so a resume scales as the
    uninterrupted run would have."""

    def __init__(self, length: int = 1):
        self.length, self.history = length, {}

    def observe(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The amax to scale `tensor` by; None for current scaling, which the quantisation
        computes itself (fused with it on CUDA)."""
        if self.length <= 1:
            return None
        amax = tensor_amax(tensor).reshape(1)
        past = self.history.get(key)
        if past is None:  # filled with the first amax: the max over it is the max of those seen
            self.history[key] = past = amax.repeat(self.length)
        else:
            past.copy_(torch.cat([past[1:], amax]))
        return past.max()

    def load(self, saved: dict, device: torch.device) -> None:
        """Take saved histories (key -> [length] tensor), into the live tensors where they exist."""
        for key, values in saved.items():
            if values.shape != (self.length,):
                raise ValueError(f"amax history {key!r} holds {values.numel()} amaxes; this run keeps {self.length}")
            past = self.history.get(key)
            if past is None:
                self.history[key] = values.to(device=device, dtype=torch.float32, copy=True)
            else:
                past.copy_(values)


def fp8_shapes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T can run in FP8: FP8 GEMMs need every size a multiple of 16, and the
    weight gradient's inner one is the token count. Other shapes stay in full precision."""
    tokens = x.numel() // max(x.shape[-1], 1)
    return not (x.shape[-1] % 16 or weight.shape[0] % 16 or tokens % 16)


def fp8_linear_fn(recipe: FP8Recipe = FP8Recipe()):
    """A drop-in for F.linear(x, weight, bias) computing in FP8 (for `layer.linear_fn`)."""
    amax_state = AmaxHistory(1 if recipe.rowwise else recipe.amax_history)

    def linear(x, weight, bias=None):
        if not fp8_shapes(x, weight):
            return torch.nn.functional.linear(x, weight, bias)
        return _FP8Linear.apply(x, weight, bias, recipe, amax_state)

    linear.fp8_recipe = recipe
    linear.fp8_backend = "trellis"
    linear.amax_state = amax_state
    return linear


def enable_fp8(module: torch.nn.Module, recipe: FP8Recipe = FP8Recipe(), backend: str = "trellis") -> int:
    """Switch every tensor-parallel linear under `module` to FP8; returns how many. Each layer
    keeps its own amax state. backend: `trellis` (this file) or `te` (Transformer Engine's
    matmul, parallel/te_fp8.py). The output projection to the vocabulary is a plain matmul on
    the embedding (tied or not) and stays in bf16, as Transformer Engine recipes leave it."""
    from parallel.layers import ColumnParallelLinear, RowParallelLinear

    if backend == "te":
        from parallel.te_fp8 import te_linear_fn as make_linear_fn
    else:
        make_linear_fn = fp8_linear_fn
    count = 0
    for layer in module.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            layer.linear_fn = make_linear_fn(recipe)
            count += 1
    return count

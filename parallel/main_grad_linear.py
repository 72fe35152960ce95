"""The default matmul of the tensor-parallel linears: F.linear whose weight gradient is
accumulated straight into the weight's fp32 `main_grad` (the gradient buffer) by the GEMM.

Without it the backward writes a bf16 weight gradient and the buffer's hook then adds it into
main_grad: an extra pass over every weight's gradient (read 2 + read/write 8 bytes an element)
each micro-batch, about 4% of a llama-1.3b step on an H100. Here the weight-gradient GEMM runs
with beta = 1 into main_grad itself (Megatron's gradient-accumulation fusion): cuBLAS reads and
writes the fp32 accumulator in its epilogue, bf16 inputs with an fp32 output
(`torch.addmm(..., out_dtype=torch.float32)`), or plain fp32 `addmm` for fp32 weights.

With `residual` (the output projection of a pre-norm sublayer, h = x + proj(y)), the forward
GEMM adds the residual stream in its epilogue (csrc/residual_gemm.cu), so the add is no pass of
its own; the residual's gradient is the output's, passed on as it is.

Autograd still needs a weight gradient so that the parameter's post-accumulate hook runs (it
counts the gradients of a bucket and starts its reduction): the backward returns an
uninitialised tensor and marks the parameter `main_grad_filled`, and the hook skips the add.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from csrc import loader


@functools.lru_cache(maxsize=None)
def _bf16_into_fp32_supported(device_type: str) -> bool:
    """Whether addmm with bf16 inputs accumulates into an fp32 output here (CUDA, recent torch)."""
    try:
        acc = torch.zeros(2, 2, device=device_type)
        a = torch.ones(2, 2, device=device_type, dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0] == 2)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of `dtype` tensors runs in here: the autocast dtype under autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def filled_placeholder(weight: torch.Tensor) -> torch.Tensor:
    """What a backward returns as the weight's gradient once it wrote it into main_grad: an
    uninitialised tensor autograd needs so the buffer's hook runs, which the flag tells to skip."""
    weight.main_grad_filled = True
    return torch.empty_like(weight)


def take_filled_flag(param: torch.Tensor) -> bool:
    """Whether a backward already wrote this parameter's gradient into main_grad, clearing the
    mark: ours (`main_grad_filled`) or Transformer Engine's (`grad_added_to_main_grad`, set by its
    linears with fuse_wgrad_accumulation, parallel/te_fp8.py)."""
    filled = getattr(param, "main_grad_filled", False) or getattr(param, "grad_added_to_main_grad", False)
    param.main_grad_filled = False
    if hasattr(param, "grad_added_to_main_grad"):
        param.grad_added_to_main_grad = False
    return filled


def fuses_into_main_grad(weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> bool:
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or main_grad.dtype != torch.float32:
        return False
    compute_dtype = compute_dtype or weight.dtype
    if compute_dtype == torch.float32:
        return True
    return compute_dtype in (torch.bfloat16, torch.float16) and _bf16_into_fp32_supported(weight.device.type)


def accumulate_weight_grad(main_grad: torch.Tensor, grad_out_2d: torch.Tensor, x_2d: torch.Tensor) -> None:
    """main_grad (fp32) += grad_out^T @ x: one GEMM where the device can write fp32 from
    bf16/fp16 inputs, else the product then an add."""
    if x_2d.dtype == torch.float32:
        main_grad.addmm_(grad_out_2d.t(), x_2d)
    elif _bf16_into_fp32_supported(x_2d.device.type):
        torch.addmm(main_grad, grad_out_2d.t(), x_2d, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.add_(grad_out_2d.t() @ x_2d)


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, written by the GEMM itself where it can (no low-precision copy to cast)."""
    if a.dtype != torch.float32 and _bf16_into_fp32_supported(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


class _LinearIntoMainGrad(torch.autograd.Function):
    """Casts to the compute dtype itself (as autocast would), so the backward multiplies the
    same tensors as the forward whatever autocast state it runs under."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, residual):
        """residual: None, or a tensor of the output's shape that loader.gemm_add takes (the
        caller checked it, and then bias is None)."""
        x_c, w_c = x.to(compute_dtype), weight.to(compute_dtype)
        b_c = bias.to(compute_dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x_c, w_c, b_c) if residual is None else loader.gemm_add(x_c, w_c, residual)
        ctx.save_for_backward(x_c, w_c)
        ctx.weight, ctx.has_bias = weight, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out.matmul(w) if ctx.needs_input_grad[0] else None
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            accumulate_weight_grad(weight.main_grad, grad_out_2d, x.reshape(-1, x.shape[-1]))
            grad_weight = filled_placeholder(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out_2d.sum(0)
        grad_residual = grad_out if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, None, grad_residual


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (+ residual), with the weight gradient accumulated into weight.main_grad when
    it can be, and the residual added by the GEMM itself when loader.gemm_add takes it."""
    # A compiled layer traces its own backward: left to F.linear.
    trains = weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    dtype = compute_dtype(x.device.type, weight.dtype) if trains else None  # inference skips the lookup
    if dtype is None or not fuses_into_main_grad(weight, dtype):
        out = F.linear(x, weight, bias)
    elif residual is not None and bias is None and x.dtype == dtype and loader.gemm_add_supported(x, weight, residual):
        return _LinearIntoMainGrad.apply(x, weight, None, dtype, residual)
    else:
        out = _LinearIntoMainGrad.apply(x, weight, bias, dtype, None)
    return out if residual is None else residual + out

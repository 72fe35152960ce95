// A bf16/fp16 GEMM that adds a matrix in its epilogue and writes a new one:
//
//   d[M, N] = a[M, K] @ b[N, K]^T + c[M, N]
//
// a holds activations, b an nn.Linear weight, c the residual stream; all row-major. This is the
// output projection of a pre-norm transformer sublayer with its residual add, h = x + proj(y):
// cuBLASLt reads c in the epilogue (beta = 1) and writes d, so the add costs one read of c
// instead of a pass of its own (read two, write one). torch.addmm cannot do it without that
// pass: out of place it first copies c into its output, and in place it would overwrite the
// residual stream, which the norm before the sublayer keeps for its backward.
// Accumulation and the add are fp32, rounded once to the output type.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cublaslt.h"
#include "kernel_host.h"
#include "trellis_gemm.h"

namespace trellis {

at::Tensor gemm_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && c.is_cuda(), "gemm_add takes CUDA tensors");
  TORCH_CHECK(a.get_device() == c.get_device() && b.get_device() == c.get_device(),
              "gemm_add: every tensor must be on c's device");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm_add takes 2-D a, b and c");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), "a, b and c must be contiguous");
  TORCH_CHECK(a.scalar_type() == c.scalar_type() && b.scalar_type() == c.scalar_type() &&
                  (c.scalar_type() == at::kBFloat16 || c.scalar_type() == at::kHalf),
              "gemm_add takes a, b and c all bfloat16 or all float16");
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  TORCH_CHECK(b.size(1) == k, "a and b must share their inner size, got ", sizes_text({k, b.size(1)}));
  TORCH_CHECK(c.size(0) == m && c.size(1) == n, "c must be ", sizes_text({m, n}), ", got ",
              sizes_text({c.size(0), c.size(1)}));
  const c10::cuda::CUDAGuard guard(c.device());
  at::Tensor d = at::empty_like(c);
  if (m == 0 || n == 0) return d;
  if (k == 0) return d.copy_(c);  // an empty product

  const cudaDataType_t type = c.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  lt::gemm_tn(a, type, nullptr, b, type, nullptr, &c, d, type, "16-bit GEMM");
  return d;
}

}  // namespace trellis

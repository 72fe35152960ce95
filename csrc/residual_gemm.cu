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

#include <algorithm>

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

  // Column-major view, as in fp8_gemm.cu: d^T [n, m] = b [k, n]^T @ a^T [k, m] + c^T.
  const cudaDataType_t type = c.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  lt::MatmulDesc desc;
  lt::check(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc create");
  lt::set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  lt::set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  lt::Layout first, second, result;
  lt::check(cublasLtMatrixLayoutCreate(&first.handle, type, k, n, k), "layout create");
  lt::check(cublasLtMatrixLayoutCreate(&second.handle, type, k, m, k), "layout create");
  lt::check(cublasLtMatrixLayoutCreate(&result.handle, type, n, m, n), "layout create");

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const uint32_t out_alignment = std::min(lt::alignment(c), lt::alignment(d));
  const lt::AlgoKey key{static_cast<int>(c.get_device()), m, n, k, static_cast<int>(type), static_cast<int>(type),
                        static_cast<int>(type), lt::alignment(b), lt::alignment(a), out_alignment};
  const cublasLtMatmulAlgo_t algo =
      lt::choose_algo(key, handle, desc.handle, first.handle, second.handle, result.handle, "16-bit GEMM");
  const at::Tensor workspace = lt::workspace(c);
  const float alpha = 1.f, beta = 1.f;
  lt::check(cublasLtMatmul(handle, desc.handle, &alpha, b.data_ptr(), first.handle, a.data_ptr(), second.handle, &beta,
                           c.data_ptr(), result.handle, d.data_ptr(), result.handle, &algo, workspace.data_ptr(),
                           lt::kWorkspaceBytes, at::cuda::getCurrentCUDAStream()),
            "matmul");
  return d;
}

}  // namespace trellis

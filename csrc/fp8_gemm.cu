// FP8 GEMM that accumulates into an fp32 matrix, for the weight gradient of parallel/fp8.py:
//
//   out[M, N] (+)= (a_scale * a[M, K]) @ (b_scale * b[N, K])^T
//
// a and b are FP8 and row-major (K contiguous, the "TN" layout Hopper's FP8 tensor cores read),
// out is fp32 and row-major, the scales are one float32 each on the GPU. cuBLASLt reads and
// writes out in its epilogue (beta = 1), so the weight gradient of every micro-batch lands in
// the fp32 main_grad without a separate fp32 product and add: torch._scaled_mm has no beta.
// That add was 12 bytes of traffic per weight per micro-batch, about 5% of an 8-layer
// llama3-8b FP8 step at eight micro-batches (docs/benchmarks.md).
//
// Its own extension (trellis_gemm), since it links cuBLASLt: a toolkit without it then costs
// this GEMM only, not the norm and softmax kernels (csrc/loader.py falls back to the product
// and add).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cublaslt.h"
#include "kernel_host.h"
#include "trellis_gemm.h"

namespace trellis {
namespace {

cudaDataType_t fp8_type(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat8_e4m3fn) return CUDA_R_8F_E4M3;
  TORCH_CHECK(t.scalar_type() == at::kFloat8_e5m2, name, " must be float8_e4m3fn or float8_e5m2, got ", t.scalar_type());
  return CUDA_R_8F_E5M2;
}

}  // namespace

// out (+)= (a_scale * a) @ (b_scale * b)^T; see the top of the file. accumulate = false
// overwrites out instead.
void fp8_gemm_accumulate(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, const at::Tensor& out, bool accumulate) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && out.is_cuda() && a_scale.is_cuda() && b_scale.is_cuda(),
              "fp8_gemm_accumulate takes CUDA tensors");
  TORCH_CHECK(a.get_device() == out.get_device() && b.get_device() == out.get_device() &&
                  a_scale.get_device() == out.get_device() && b_scale.get_device() == out.get_device(),
              "fp8_gemm_accumulate: every tensor must be on out's device");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, "fp8_gemm_accumulate takes 2-D a, b and out");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && out.is_contiguous(), "a, b and out must be contiguous");
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  TORCH_CHECK(b.size(1) == k, "a and b must share their inner size, got ", sizes_text({k, b.size(1)}));
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be ", sizes_text({m, n}), ", got ",
              sizes_text({out.size(0), out.size(1)}));
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32, got ", out.scalar_type());
  TORCH_CHECK(m % 16 == 0 && n % 16 == 0 && k % 16 == 0, "FP8 GEMM sizes must be multiples of 16, got m, n, k = ",
              sizes_text({m, n, k}));
  for (const auto* scale : {&a_scale, &b_scale}) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == 1, "scales must be one float32 each");
  }
  const cudaDataType_t a_type = fp8_type(a, "a"), b_type = fp8_type(b, "b");
  TORCH_CHECK(a_type == CUDA_R_8F_E4M3 || b_type == CUDA_R_8F_E4M3, "FP8 GEMMs cannot multiply e5m2 by e5m2");
  if (m == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  if (k == 0) {  // an empty sum: out stays, or becomes 0
    if (!accumulate) out.zero_();
    return;
  }

  lt::gemm_tn(a, a_type, a_scale.data_ptr(), b, b_type, b_scale.data_ptr(), accumulate ? &out : nullptr, out,
              CUDA_R_32F, "FP8 GEMM");
}

}  // namespace trellis

// The cuBLASLt GEMMs of the trellis_gemm extension (bound in gemm_bindings.cu).
#pragma once

#include <ATen/ATen.h>

namespace trellis {

// out (+)= (a_scale * a) @ (b_scale * b)^T with FP8 a [m, k], b [n, k] and fp32 out [m, n]
// (fp8_gemm.cu); accumulate = false overwrites out.
void fp8_gemm_accumulate(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, const at::Tensor& out, bool accumulate);

// a @ b^T + c as a new tensor, a [m, k], b [n, k], c [m, n], all bf16 or all fp16
// (residual_gemm.cu).
at::Tensor gemm_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);

}  // namespace trellis

// cuBLASLt glue shared by the GEMMs of the trellis_gemm extension (fp8_gemm.cu,
// residual_gemm.cu): status checks, owned descriptors, operand alignment, one cached
// heuristic choice per GEMM shape, and the one "TN" GEMM call both make (gemm_tn).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace trellis {
namespace lt {

constexpr int64_t kWorkspaceBytes = 32 << 20;  // what cuBLAS recommends on Hopper

inline void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "cuBLASLt ", what, " failed: ", cublasLtGetStatusString(status));
}

// The largest power of two up to 256 that divides the address: cuBLASLt picks kernels by the
// alignment it is promised, and a view into a flat buffer (a main_grad) may sit anywhere.
inline uint32_t alignment(const at::Tensor& t) {
  const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
  uint32_t bytes = 256;
  while (bytes > 1 && address % bytes != 0) bytes /= 2;
  return bytes;
}

template <typename T, cublasStatus_t (*Destroy)(T)>
struct Owned {  // a cuBLASLt descriptor destroyed with its scope
  T handle = nullptr;
  ~Owned() {
    if (handle != nullptr) Destroy(handle);
  }
};
using MatmulDesc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <typename V>
void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const V& value) {
  check(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)), "matmul attribute");
}

inline void set_preference(cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute,
                           uint32_t value) {
  check(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value)), "preference attribute");
}

// What a heuristic choice depends on: device, m, n, k, the three data types, and the
// alignments of the first operand, the second and the output.
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, uint32_t, uint32_t, uint32_t>;

// The heuristic's first choice for D = op(A) op(B) (+ C with C laid out as D), cached per key:
// the query costs tens of microseconds, and a model asks for the same few shapes every step.
inline cublasLtMatmulAlgo_t choose_algo(const AlgoKey& key, cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                        cublasLtMatrixLayout_t a_layout, cublasLtMatrixLayout_t b_layout,
                                        cublasLtMatrixLayout_t out_layout, const char* what) {
  static std::mutex mutex;
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> chosen;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = chosen.find(key);
  if (found != chosen.end()) return found->second;
  Preference preference;
  check(cublasLtMatmulPreferenceCreate(&preference.handle), "preference create");
  const uint64_t workspace = kWorkspaceBytes;
  check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                             sizeof(workspace)), "preference workspace");
  set_preference(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, std::get<7>(key));
  set_preference(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, std::get<8>(key));
  set_preference(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, std::get<9>(key));
  set_preference(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, std::get<9>(key));
  cublasLtMatmulHeuristicResult_t result = {};
  int found_count = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, out_layout, out_layout, preference.handle, 1,
                                       &result, &found_count), "heuristic");
  TORCH_CHECK(found_count > 0, "cuBLASLt has no ", what, " for this shape, types and alignment");
  chosen.emplace(key, result.algo);
  return result.algo;
}

// A workspace for one GEMM from torch's caching allocator (stream-ordered, capturable).
inline at::Tensor workspace(const at::Tensor& like) {
  return at::empty({kWorkspaceBytes}, like.options().dtype(at::kByte));
}

// d [m, n] = (a_scale a [m, k]) @ (b_scale b [n, k])^T + beta c [m, n], all row-major, fp32
// accumulation; beta is 1 with c (which may be d itself) and 0 without. The scales are device
// floats (FP8 operands) or null. cuBLAS is column-major: d^T [n, m] = b @ a^T, so its first
// operand is b ([n, k] row-major = [k, n] column-major, transposed) and its second a.
inline void gemm_tn(const at::Tensor& a, cudaDataType_t a_type, const void* a_scale, const at::Tensor& b,
                    cudaDataType_t b_type, const void* b_scale, const at::Tensor* c, const at::Tensor& d,
                    cudaDataType_t d_type, const char* what) {
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  MatmulDesc desc;
  check(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc create");
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (b_scale != nullptr) set(desc.handle, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, b_scale);
  if (a_scale != nullptr) set(desc.handle, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, a_scale);
  Layout first, second, result;
  check(cublasLtMatrixLayoutCreate(&first.handle, b_type, k, n, k), "layout create");
  check(cublasLtMatrixLayoutCreate(&second.handle, a_type, k, m, k), "layout create");
  check(cublasLtMatrixLayoutCreate(&result.handle, d_type, n, m, n), "layout create");

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const uint32_t out_alignment = c != nullptr ? std::min(alignment(*c), alignment(d)) : alignment(d);
  const AlgoKey key{static_cast<int>(d.get_device()), m, n, k, static_cast<int>(a_type), static_cast<int>(b_type),
                    static_cast<int>(d_type), alignment(b), alignment(a), out_alignment};
  const cublasLtMatmulAlgo_t algo = choose_algo(key, handle, desc.handle, first.handle, second.handle, result.handle, what);
  const at::Tensor space = workspace(d);
  const float alpha = 1.f, beta = c != nullptr ? 1.f : 0.f;
  const void* c_data = c != nullptr ? c->data_ptr() : d.data_ptr();
  check(cublasLtMatmul(handle, desc.handle, &alpha, b.data_ptr(), first.handle, a.data_ptr(), second.handle, &beta,
                       c_data, result.handle, d.data_ptr(), result.handle, &algo, space.data_ptr(), kWorkspaceBytes,
                       at::cuda::getCurrentCUDAStream()),
        "matmul");
}

}  // namespace lt
}  // namespace trellis

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
#include <cublasLt.h>
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "kernel_host.h"

namespace trellis {
namespace {

constexpr int64_t kWorkspaceBytes = 32 << 20;  // what cuBLAS recommends on Hopper

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "cuBLASLt ", what, " failed: ", cublasLtGetStatusString(status));
}

cudaDataType_t fp8_type(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat8_e4m3fn) return CUDA_R_8F_E4M3;
  TORCH_CHECK(t.scalar_type() == at::kFloat8_e5m2, name, " must be float8_e4m3fn or float8_e5m2, got ", t.scalar_type());
  return CUDA_R_8F_E5M2;
}

// The largest power of two up to 256 that divides the address: cuBLASLt picks kernels by the
// alignment it is promised, and a main_grad view into a flat buffer may sit anywhere.
uint32_t alignment(const at::Tensor& t) {
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

// Heuristic choices by shape, types, alignments and device: the query costs tens of
// microseconds, and a model asks for the same few shapes every micro-batch.
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, uint32_t, uint32_t, uint32_t>;

cublasLtMatmulAlgo_t choose_algo(const AlgoKey& key, cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                 cublasLtMatrixLayout_t a_layout, cublasLtMatrixLayout_t b_layout,
                                 cublasLtMatrixLayout_t c_layout) {
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
  const uint32_t a_align = std::get<6>(key), b_align = std::get<7>(key), c_align = std::get<8>(key);
  check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_align,
                                             sizeof(a_align)), "preference alignment");
  check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_align,
                                             sizeof(b_align)), "preference alignment");
  check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_align,
                                             sizeof(c_align)), "preference alignment");
  check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c_align,
                                             sizeof(c_align)), "preference alignment");
  cublasLtMatmulHeuristicResult_t result = {};
  int found_count = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, c_layout, c_layout, preference.handle, 1,
                                       &result, &found_count), "heuristic");
  TORCH_CHECK(found_count > 0, "cuBLASLt has no FP8 GEMM for this shape, types and alignment");
  chosen.emplace(key, result.algo);
  return result.algo;
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

  // cuBLAS is column-major: out row-major [m, n] is out^T column-major [n, m] = b @ a^T, so its
  // first operand is b ([n, k] row-major = [k, n] column-major, transposed) and its second a.
  MatmulDesc desc;
  check(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc create");
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  set(desc.handle, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, b_scale.data_ptr());
  set(desc.handle, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, a_scale.data_ptr());
  Layout first, second, result;
  check(cublasLtMatrixLayoutCreate(&first.handle, b_type, k, n, k), "layout create");
  check(cublasLtMatrixLayoutCreate(&second.handle, a_type, k, m, k), "layout create");
  check(cublasLtMatrixLayoutCreate(&result.handle, CUDA_R_32F, n, m, n), "layout create");

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const AlgoKey key{static_cast<int>(out.get_device()), m, n, k, static_cast<int>(a_type), static_cast<int>(b_type), alignment(b),
                    alignment(a), alignment(out)};
  const cublasLtMatmulAlgo_t algo = choose_algo(key, handle, desc.handle, first.handle, second.handle, result.handle);
  auto workspace = at::empty({kWorkspaceBytes}, out.options().dtype(at::kByte));
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  check(cublasLtMatmul(handle, desc.handle, &alpha, b.data_ptr(), first.handle, a.data_ptr(), second.handle, &beta,
                       out.data_ptr(), result.handle, out.data_ptr(), result.handle, &algo, workspace.data_ptr(),
                       kWorkspaceBytes, at::cuda::getCurrentCUDAStream()),
        "matmul");
}

}  // namespace trellis

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Trellis FP8 GEMM accumulating into an fp32 output (cuBLASLt)";
  m.def("fp8_gemm_accumulate", &trellis::fp8_gemm_accumulate,
        "out (+)= (a_scale * a) @ (b_scale * b)^T with FP8 a [m, k], b [n, k] and fp32 out [m, n]", py::arg("a"),
        py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("out"), py::arg("accumulate") = true);
}

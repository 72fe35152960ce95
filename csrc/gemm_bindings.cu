// Python bindings of the trellis_gemm extension (cuBLASLt GEMMs, JIT-built by csrc/loader.py).
#include <torch/extension.h>

#include "trellis_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Trellis cuBLASLt GEMMs: FP8 accumulating into fp32, and bf16/fp16 with a residual add";
  m.def("fp8_gemm_accumulate", &trellis::fp8_gemm_accumulate,
        "out (+)= (a_scale * a) @ (b_scale * b)^T with FP8 a [m, k], b [n, k] and fp32 out [m, n]", py::arg("a"),
        py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("out"), py::arg("accumulate") = true);
  m.def("gemm_add", &trellis::gemm_add, "a @ b^T + c (new tensor) with a [m, k], b [n, k], c [m, n], bf16 or fp16",
        py::arg("a"), py::arg("b"), py::arg("c"));
}

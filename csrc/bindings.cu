// Python bindings of the trellis_kernels extension (JIT-built by csrc/loader.py).
// Kept in a .cu file: setup.py compiles every csrc/*.cpp into a different module.
#include <torch/extension.h>

#include "trellis_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Trellis fused RMSNorm / LayerNorm and scale-mask-softmax CUDA kernels";
  m.def("norm_forward", &trellis::norm_forward, "RMSNorm/LayerNorm forward -> [y, mean, rstd]",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_backward", &trellis::norm_backward, "RMSNorm/LayerNorm backward -> [dx, dweight, dbias]",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("rms"), py::arg("need_weight_grad"), py::arg("blocks") = 0);
  m.def("softmax_forward", &trellis::softmax_forward, "scale + mask + softmax forward", py::arg("scores"),
        py::arg("mask"), py::arg("scale"), py::arg("causal"));
  m.def("softmax_backward", &trellis::softmax_backward, "scale + mask + softmax backward", py::arg("dy"),
        py::arg("y"), py::arg("scale"), py::arg("causal"));
  m.attr("max_norm_hidden") = trellis::max_norm_hidden();
  m.attr("max_softmax_keys") = trellis::max_softmax_keys();
}

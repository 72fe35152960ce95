// Python bindings of the trellis_kernels extension (JIT-built by csrc/loader.py).
// Kept in a .cu file: setup.py compiles every csrc/*.cpp into a different module.
#include <torch/extension.h>

#include "trellis_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Trellis fused RMSNorm / LayerNorm, scale-mask-softmax, SwiGLU, QKV-RoPE, FP8 cast, embedding-gradient, AdamW, NF4-dequantise and decode-attention CUDA kernels";
  m.def("norm_forward", &trellis::norm_forward, "RMSNorm/LayerNorm forward -> [y, mean, rstd]",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_backward", &trellis::norm_backward, "RMSNorm/LayerNorm backward -> [dx, dweight, dbias]",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("rms"), py::arg("need_weight_grad"), py::arg("dresidual") = py::none(), py::arg("blocks") = 0);
  m.def("softmax_forward", &trellis::softmax_forward, "scale + mask + softmax forward", py::arg("scores"),
        py::arg("mask"), py::arg("scale"), py::arg("causal"));
  m.def("softmax_backward", &trellis::softmax_backward, "scale + mask + softmax backward", py::arg("dy"),
        py::arg("y"), py::arg("scale"), py::arg("causal"));
  m.def("fp8_amax", &trellis::fp8_amax, "max |x| as one float32", py::arg("x"));
  m.def("fp8_cast_transpose", &trellis::fp8_cast_transpose, "FP8 cast in both layouts -> [x8, x8_t, inverse_scale]",
        py::arg("x"), py::arg("amax"), py::arg("e5m2"));
  m.def("swiglu_forward", &trellis::swiglu_forward, "silu(gate) * up of h = [gate | up]", py::arg("h"));
  m.def("swiglu_backward", &trellis::swiglu_backward, "SwiGLU backward -> dh", py::arg("h"), py::arg("dy"));
  m.def("qkv_rope_forward", &trellis::qkv_rope_forward, "QKV split + RoPE -> [q, k, v]", py::arg("qkv"),
        py::arg("cos"), py::arg("sin"), py::arg("heads"), py::arg("kv_heads"));
  m.def("qkv_rope_backward", &trellis::qkv_rope_backward, "QKV split + RoPE backward -> d qkv", py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("cos"), py::arg("sin"));
  m.def("embedding_grad_accumulate", &trellis::embedding_grad_accumulate,
        "table[ids] += grad rows, from sorted ids (deterministic)", py::arg("table"), py::arg("sorted_ids"),
        py::arg("order"), py::arg("grad"));
  m.def("adamw_step", &trellis::adamw_step,
        "AdamW step in place over flat float32 master/grad/moments, optionally writing the 16-bit weights",
        py::arg("master"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("model_out"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("grad_scale") = py::none());
  m.def("nf4_dequantize", &trellis::nf4_dequantize, "NF4 codes and block scales -> out (in place)", py::arg("out"),
        py::arg("packed"), py::arg("code_values"), py::arg("absmax"), py::arg("absmax_codes"), py::arg("absmax_step"),
        py::arg("absmax_mean"));
  m.def("decode_attention", &trellis::decode_attention,
        "one new token per row attended over a KV cache up to a device-held position (writes its k, v there)",
        py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("keys"), py::arg("values"), py::arg("visible"),
        py::arg("position"), py::arg("splits") = 0);
  m.attr("max_norm_hidden") = trellis::max_norm_hidden();
  m.attr("max_softmax_keys") = trellis::max_softmax_keys();
}

// One AdamW step over flat fp32 tensors that also writes the 16-bit model weights.
//
// The optimizer's state of a bucket shard is flat (fp32 master, main_grad, both moments), so
// one pass can read master + grad + exp_avg + exp_avg_sq and write master + exp_avg +
// exp_avg_sq and the bf16/fp16 weight: 34 bytes an element, where torch's fused AdamW (32
// bytes) followed by a master-to-model copy (6 bytes) moves 38 in two passes.
//
// The math is torch.optim.AdamW's (foreach path), element by element:
//   g = grad * grad_scale;  p *= 1 - lr wd;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g g
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The bias corrections are computed on the host in double precision, as torch does. The
// extension builds with --use_fast_math, so the division and the square root use the
// round-to-nearest intrinsics: the approximate ones would drift from torch by several ulps.
//
// Each thread moves 16-byte vectors (float4; 4 model elements = 8 bytes) in a grid-stride
// loop; the last n % 4 elements take a scalar path. Every pointer must be 16-byte aligned (the
// host refuses others with an error; csrc/loader.py sends misaligned tensors to the torch
// reference instead). The optimizer's runs start at parameter offsets, which the gradient
// buffer keeps at multiples of 64 elements, so in training they always are.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kAdamThreads = 256;
constexpr int kAdamBlocksPerSM = 8;  // enough resident warps to keep 4 loads each in flight

// Host-computed step constants, in fp32 as the kernel uses them.
struct AdamWConstants {
  float beta1_complement;  // 1 - beta1, the lerp weight
  float beta2, beta2_complement;
  float eps;
  float decay;             // 1 - lr * weight_decay
  float step_size;         // lr / (1 - beta1^step)
  float bias2_sqrt;        // sqrt(1 - beta2^step)
};

// torch's lerp: start + w (end - start), or end - (end - start)(1 - w) for w >= 0.5, so that
// w = 1 gives `end` exactly.
__device__ __forceinline__ float lerp(float start, float end, float weight) {
  const float diff = end - start;
  return weight < 0.5f ? fmaf(weight, diff, start) : fmaf(-diff, 1.f - weight, end);
}

// Updates one element in place; returns the new master value.
__device__ __forceinline__ float adamw_element(float& p, float g, float& m, float& v, const AdamWConstants& c) {
  p *= c.decay;
  m = lerp(m, g, c.beta1_complement);
  v = c.beta2 * v + c.beta2_complement * (g * g);
  const float denom = __fdiv_rn(__fsqrt_rn(v), c.bias2_sqrt) + c.eps;
  p -= c.step_size * __fdiv_rn(m, denom);
  return p;
}

// Four model elements (8 bytes) written as one store.
template <typename Model>
__device__ __forceinline__ void store_model4(Model* dst, const float4& p) {
  union {
    Model element[4];
    uint2 word;
  } packed;
  packed.element[0] = from_float<Model>(p.x);
  packed.element[1] = from_float<Model>(p.y);
  packed.element[2] = from_float<Model>(p.z);
  packed.element[3] = from_float<Model>(p.w);
  *reinterpret_cast<uint2*>(dst) = packed.word;
}

// Model is __nv_bfloat16 or __half (model_out written), or void (no model output).
template <typename Model>
__global__ void __launch_bounds__(kAdamThreads) adamw_kernel(
    float* __restrict__ master, const float* __restrict__ grad, float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq, Model* __restrict__ model_out, const float* __restrict__ grad_scale,
    AdamWConstants c, int64_t n) {
  constexpr bool kWritesModel = !std::is_void<Model>::value;
  const float scale = grad_scale != nullptr ? *grad_scale : 1.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = n / 4;
  for (int64_t i = first; i < vectors; i += stride) {
    float4 p = reinterpret_cast<const float4*>(master)[i];
    const float4 g = reinterpret_cast<const float4*>(grad)[i];
    float4 m = reinterpret_cast<const float4*>(exp_avg)[i];
    float4 v = reinterpret_cast<const float4*>(exp_avg_sq)[i];
    adamw_element(p.x, g.x * scale, m.x, v.x, c);
    adamw_element(p.y, g.y * scale, m.y, v.y, c);
    adamw_element(p.z, g.z * scale, m.z, v.z, c);
    adamw_element(p.w, g.w * scale, m.w, v.w, c);
    reinterpret_cast<float4*>(master)[i] = p;
    reinterpret_cast<float4*>(exp_avg)[i] = m;
    reinterpret_cast<float4*>(exp_avg_sq)[i] = v;
    if constexpr (kWritesModel) store_model4(model_out + 4 * i, p);
  }
  for (int64_t i = 4 * vectors + first; i < n; i += stride) {  // the last n % 4 elements
    const float p = adamw_element(master[i], grad[i] * scale, exp_avg[i], exp_avg_sq[i], c);
    if constexpr (kWritesModel) model_out[i] = from_float<Model>(p);
  }
}

namespace {

AdamWConstants adamw_constants(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  AdamWConstants c;
  c.beta1_complement = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.beta2_complement = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  c.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  return c;
}

void check_adamw_inputs(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& model_out,
                        const c10::optional<at::Tensor>& grad_scale, int64_t step) {
  const std::pair<const at::Tensor*, const char*> states[] = {
      {&master, "master"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [tensor, name] : states) {
    check_cuda_contiguous(*tensor, name);
    TORCH_CHECK(tensor->scalar_type() == at::kFloat, name, " must be float32, got ", tensor->scalar_type());
    TORCH_CHECK(tensor->numel() == master.numel(), name, " has ", text(tensor->numel()), " elements, master ",
                text(master.numel()));
    TORCH_CHECK(tensor->get_device() == master.get_device(), name, " must be on master's device");
  }
  if (model_out.has_value()) {
    check_cuda_contiguous(*model_out, "model_out");
    TORCH_CHECK(model_out->scalar_type() == at::kBFloat16 || model_out->scalar_type() == at::kHalf,
                "model_out must be bfloat16 or float16, got ", model_out->scalar_type());
    TORCH_CHECK(model_out->numel() == master.numel() && model_out->get_device() == master.get_device(),
                "model_out must have master's ", text(master.numel()), " elements and device");
  }
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->is_cuda() && grad_scale->get_device() == master.get_device() &&
                    grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                "grad_scale must be one float32 on master's device");
  }
  TORCH_CHECK(step >= 1, "step must be at least 1 (the update being taken), got ", text(step));
}

}  // namespace

void adamw_step(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& model_out, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step,
                const c10::optional<at::Tensor>& grad_scale) {
  check_adamw_inputs(master, grad, exp_avg, exp_avg_sq, model_out, grad_scale, step);
  const int64_t n = master.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(master.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamWConstants c = adamw_constants(lr, beta1, beta2, eps, weight_decay, step);
  const int64_t wanted = (std::max<int64_t>(n / 4, 1) + kAdamThreads - 1) / kAdamThreads;
  const int64_t resident = static_cast<int64_t>(device_props(master.get_device()).multiProcessorCount) * kAdamBlocksPerSM;
  const unsigned blocks = static_cast<unsigned>(std::min(wanted, resident));
  const float* scale = grad_scale.has_value() ? ptr<float>(*grad_scale) : nullptr;
  auto launch = [&](auto* model) {
    using Model = std::remove_pointer_t<decltype(model)>;
    adamw_kernel<Model><<<blocks, kAdamThreads, 0, stream>>>(ptr<float>(master), ptr<float>(grad), ptr<float>(exp_avg),
                                                             ptr<float>(exp_avg_sq), model, scale, c, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!model_out.has_value()) {
    launch(static_cast<void*>(nullptr));
  } else if (model_out->scalar_type() == at::kBFloat16) {
    launch(ptr<__nv_bfloat16>(*model_out));
  } else {
    launch(ptr<__half>(*model_out));
  }
}

}  // namespace trellis

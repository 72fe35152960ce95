// Fused SwiGLU forward and backward.
//
// h holds [gate | up] along its last dimension (the fused fc1 output, per TP rank), f columns
// each; y = silu(gate) * up. Both passes are pure bandwidth: the forward reads 2f and writes f
// elements per row, the backward reads 2f + f and writes 2f. Each thread moves one 16-byte
// vector of gate, the matching vector of up (and of dy), so every access is a 128-bit one.
// Math is fp32 with one rounding at the end, as torch.compile's fused kernel computes it.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kSwigluThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// Forward grid: one dimension, in memory order (block b takes row b / blocks_per_row); the
// backward's: x = row, y = block of 16-byte column vectors within the row. On an H200 the
// forward ran 0.3-2.3% faster in memory order, the backward 13-16% slower (docs/benchmarks.md).
template <typename T>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_forward_kernel(
    const T* __restrict__ h, T* __restrict__ y, int64_t f, int64_t blocks_per_row) {
  constexpr int kVec = vec_elems<T>();
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t col = ((blockIdx.x - row * blocks_per_row) * blockDim.x + threadIdx.x) * kVec;
  if (col >= f) return;
  const T* gate_ptr = h + row * 2 * f + col;
  Pack<T, kVec> gate, up, out;
  gate.load(gate_ptr);
  up.load(gate_ptr + f);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float g = gate.get(j);
    out.set(j, g * sigmoid(g) * up.get(j));
  }
  out.store(y + row * f + col);
}

// d gate = dy * up * s * (1 + g * (1 - s)), d up = dy * g * s, with s = sigmoid(g).
template <typename T>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_backward_kernel(
    const T* __restrict__ h, const T* __restrict__ dy, T* __restrict__ dh, int64_t f) {
  constexpr int kVec = vec_elems<T>();
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (col >= f) return;
  const int64_t row = blockIdx.x;
  const int64_t offset = row * 2 * f + col;
  Pack<T, kVec> gate, up, grad, d_gate, d_up;
  gate.load(h + offset);
  up.load(h + offset + f);
  grad.load(dy + row * f + col);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float g = gate.get(j), u = up.get(j), d = grad.get(j);
    const float s = sigmoid(g);
    d_gate.set(j, d * u * s * (1.f + g * (1.f - s)));
    d_up.set(j, d * g * s);
  }
  d_gate.store(dh + offset);
  d_up.store(dh + offset + f);
}

namespace {

// f (columns of gate and of up) after checking h's shape; rows is h.numel() / (2 f).
int64_t swiglu_columns(const at::Tensor& h) {
  check_cuda_contiguous(h, "h");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, "h must hold [gate | up] in an even last dimension");
  const int64_t f = h.size(-1) / 2;
  TORCH_CHECK(f > 0 && f % 8 == 0, "gate/up width must be a positive multiple of 8, got ", text(f));
  TORCH_CHECK(h.numel() / h.size(-1) <= INT32_MAX, "too many rows");
  return f;
}

int64_t blocks_per_row(int64_t f, int vec) { return (f / vec + kSwigluThreads - 1) / kSwigluThreads; }

dim3 swiglu_grid(int64_t rows, int64_t f, int vec) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(blocks_per_row(f, vec)));
}

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& h) {
  const int64_t f = swiglu_columns(h);
  const c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> out_shape = h.sizes().vec();
  out_shape.back() = f;
  at::Tensor y = at::empty(out_shape, h.options());
  const int64_t rows = h.numel() / (2 * f);
  if (rows == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t per_row = blocks_per_row(f, vec_elems<T>());
    TORCH_CHECK(rows * per_row <= INT32_MAX, "too many rows for the SwiGLU forward grid: ", text(rows));
    swiglu_forward_kernel<T><<<static_cast<unsigned>(rows * per_row), kSwigluThreads, 0, stream>>>(
        ptr<T>(h), ptr<T>(y), f, per_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& h, const at::Tensor& dy) {
  const int64_t f = swiglu_columns(h);
  check_cuda_contiguous(dy, "dy");
  TORCH_CHECK(dy.scalar_type() == h.scalar_type(), "dy must have h's dtype");
  TORCH_CHECK(dy.dim() == h.dim() && dy.size(-1) == f && dy.numel() * 2 == h.numel(),
              "dy must have h's shape with half its last dimension");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor dh = at::empty_like(h);
  const int64_t rows = h.numel() / (2 * f);
  if (rows == 0) return dh;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_backward_kernel<T><<<swiglu_grid(rows, f, vec_elems<T>()), kSwigluThreads, 0, stream>>>(
        ptr<T>(h), ptr<T>(dy), ptr<T>(dh), f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dh;
}

}  // namespace trellis

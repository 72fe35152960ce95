// Fused RMSNorm / LayerNorm forward.
//
// One read of x and one write of y per element: the row stays in registers between the
// statistics and the normalisation. Statistics are fp32; LayerNorm uses the two-pass
// variance (mean first, then the mean of squared deviations), which is exact-ish because
// the row is already in registers. mean (LayerNorm) and rstd are saved for the backward.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

template <typename T, typename W, int kItems, bool kWarpRows, bool kRms>
__global__ void __launch_bounds__(kMaxRowThreads) norm_forward_kernel(
    const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
    int64_t rows, int hidden, float eps) {
  constexpr int kVec = vec_elems<T>();
  __shared__ float scratch[kWarpSize];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only a warp-owned row can be past the end (the block grid is exact); the whole warp
  // leaves together, so no barrier is left waiting.
  if (row >= rows) return;
  const int lane = threadIdx.x, width = blockDim.x, vecs = hidden / kVec;
  const T* x_row = x + row * hidden;

  // Issue every load of the row before the first use.
  Pack<T, kVec> xs[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width;
    if (v < vecs) xs[i].load(x_row + v * kVec); else xs[i].zero();
  }

  float mean = 0.f;
  if constexpr (!kRms) {
    float sum = 0.f;  // padding vectors are zero and add nothing
#pragma unroll
    for (int i = 0; i < kItems; ++i)
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum += xs[i].get(j);
    mean = row_sum<kWarpRows>(sum, scratch) / hidden;
  }
  float sq_sum = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (lane + i * width < vecs) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = xs[i].get(j) - mean;
        sq_sum += d * d;
      }
    }
  }
  // The last reduction of the block's one row: no barrier after it.
  const float rstd = rsqrtf(row_sum<kWarpRows, /*kScratchReused=*/false>(sq_sum, scratch) / hidden + eps);
  if (lane == 0) {
    rstd_out[row] = rstd;
    if constexpr (!kRms) mean_out[row] = mean;
  }

  T* y_row = y + row * hidden;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width;
    if (v >= vecs) continue;
    Pack<W, kVec> w, b;
    w.load(weight + v * kVec);
    Pack<T, kVec> out;
    if constexpr (kRms) {  // no bias, no mean: nothing to load or add per element
#pragma unroll
      for (int j = 0; j < kVec; ++j) out.set(j, xs[i].get(j) * rstd * w.get(j));
    } else {
      if (bias != nullptr) b.load(bias + v * kVec); else b.zero();
#pragma unroll
      for (int j = 0; j < kVec; ++j) out.set(j, (xs[i].get(j) - mean) * rstd * w.get(j) + b.get(j));
    }
    out.store(y_row + v * kVec);
  }
}

std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cuda_contiguous(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias and weight must share a dtype");
    TORCH_CHECK(bias->numel() == weight.numel(), "bias and weight must have the same size");
  }
  TORCH_CHECK(!rms || !has_bias, "RMSNorm takes no bias");
  TORCH_CHECK(x.dim() >= 1, "x must have a hidden dimension");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "weight must have hidden (", text(hidden), ") elements");
  TORCH_CHECK(hidden % 8 == 0, "hidden size must be a multiple of 8, got ", text(hidden));
  TORCH_CHECK(hidden <= max_norm_hidden(), "hidden size above ", text(max_norm_hidden()));
  const int64_t rows = x.numel() / hidden;
  TORCH_CHECK(rows <= INT32_MAX, "too many rows");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor mean = rms ? at::empty({0}, rstd.options()) : at::empty({rows}, rstd.options());
  if (rows == 0) return {y, mean, rstd};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_norm_types(x.scalar_type(), weight.scalar_type(), [&](auto x_tag, auto w_tag) {
    using T = typename decltype(x_tag)::type;
    using W = typename decltype(w_tag)::type;
    constexpr int kMaxItems = max_items_for<T>(max_norm_hidden());
    // The launcher for RMSNorm or LayerNorm, so each dispatch below instantiates one kind's kernels.
    auto launcher = [&](auto rms_tag) {
      return [&, rms_tag](const RowLayout& layout, auto items, auto warp_rows) {
        constexpr bool kRms = decltype(rms_tag)::value;
        norm_forward_kernel<T, W, decltype(items)::value, decltype(warp_rows)::value, kRms>
            <<<row_grid(layout, rows), row_block(layout), 0, stream>>>(
                ptr<T>(x), ptr<W>(weight), has_bias ? ptr<W>(*bias) : nullptr, ptr<T>(y),
                kRms ? nullptr : ptr<float>(mean), ptr<float>(rstd), rows, static_cast<int>(hidden),
                static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
    };
    // RMSNorm, one sum per row, spreads a block's row over 2 vectors a thread; LayerNorm keeps 4
    // (measured on an H200, docs/benchmarks.md).
    const int64_t vecs = hidden / vec_elems<T>();
    const bool launched = rms ? dispatch_row_layout<kMaxItems, 2>(vecs, launcher(std::true_type{}))
                              : dispatch_row_layout<kMaxItems, 4>(vecs, launcher(std::false_type{}));
    TORCH_CHECK(launched, "no launch layout for hidden ", text(hidden));
  });
  return {y, mean, rstd};
}

}  // namespace trellis

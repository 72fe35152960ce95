// Fused scale + mask + softmax over the key dimension of attention scores [b, h, sq, sk].
//
// Forward: one read of the scores (plus the mask bytes) and one write of the probabilities;
// the row stays in registers for the max, the exponentials and the normalisation, all in
// fp32. Masked entries get probability 0; a row with every key masked gives all zeros.
// Backward reads the saved probabilities y and dy: dx = scale * y * (dy - sum(dy * y)).
// With `causal`, key j is visible to query i iff j <= i + (sk - sq) (bottom-right aligned,
// the usual convention when sq < sk, e.g. a KV cache); vectors wholly to the right of the
// diagonal are neither read nor computed, only written (zeros).
#include <climits>

#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

struct SoftmaxRow {
  int64_t row;     // flat row index over b * h * sq
  int query;       // i, the query position of the row
  int last_key;    // the last visible key column (INT_MAX when not causal)
};

__device__ __forceinline__ SoftmaxRow softmax_row(int64_t row, int sq, int sk, bool causal) {
  const int query = static_cast<int>(row % sq);
  return {row, query, causal ? query + (sk - sq) : INT_MAX};
}

template <typename T, int kItems, bool kWarpRows>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_forward_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ mask, int64_t mask_stride_b,
    int64_t mask_stride_h, int64_t mask_stride_q, T* __restrict__ y, int64_t rows, int heads, int sq,
    int sk, float scale, bool causal) {
  constexpr int kVec = vec_elems<T>();
  __shared__ float scratch[kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // warp-owned rows only; see norm_forward_kernel
  const SoftmaxRow r = softmax_row(row, sq, sk, causal);
  const int lane = threadIdx.x, width = blockDim.x, vecs = sk / kVec;
  const T* x_row = x + row * sk;
  const uint8_t* mask_row = nullptr;
  if (mask != nullptr) {
    const int64_t bh = row / sq;
    mask_row = mask + (bh / heads) * mask_stride_b + (bh % heads) * mask_stride_h + r.query * mask_stride_q;
  }

  // Load, scale and mask; masked entries become -inf.
  float vals[kItems][kVec];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width, col = v * kVec;
    if (v < vecs && col <= r.last_key) {
      Pack<T, kVec> p;
      p.load(x_row + col);
      MaskBytes<kVec> m;
      if (mask_row != nullptr) m.load(mask_row + col);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const bool masked = col + j > r.last_key || (mask_row != nullptr && m.get(j));
        vals[i][j] = masked ? -INFINITY : p.get(j) * scale;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) vals[i][j] = -INFINITY;
    }
  }

  float local_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kItems; ++i)
#pragma unroll
    for (int j = 0; j < kVec; ++j) local_max = fmaxf(local_max, vals[i][j]);
  const float row_maximum = row_max<kWarpRows>(local_max, scratch);
  // A fully masked row has max -inf; (-inf) - (-inf) would be NaN, so its sum stays 0.
  const bool empty_row = row_maximum == -INFINITY;

  float local_sum = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i)
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      vals[i][j] = empty_row ? 0.f : __expf(vals[i][j] - row_maximum);  // exp(-inf) = 0
      local_sum += vals[i][j];
    }
  const float total = row_sum<kWarpRows>(local_sum, scratch);
  const float inv_total = empty_row ? 0.f : 1.f / total;

  T* y_row = y + row * sk;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width;
    if (v >= vecs) continue;
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.set(j, vals[i][j] * inv_total);
    out.store(y_row + v * kVec);
  }
}

template <typename T, int kItems, bool kWarpRows>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows, int sq, int sk,
    float scale, bool causal) {
  constexpr int kVec = vec_elems<T>();
  __shared__ float scratch[kWarpSize];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const SoftmaxRow r = softmax_row(row, sq, sk, causal);
  const int lane = threadIdx.x, width = blockDim.x, vecs = sk / kVec;
  const T* dy_row = dy + row * sk;
  const T* y_row = y + row * sk;

  // Right of the causal diagonal y is 0, so those vectors need no reads.
  Pack<T, kVec> dys[kItems], ys[kItems];
  float local_dot = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width, col = v * kVec;
    if (v < vecs && col <= r.last_key) {
      dys[i].load(dy_row + col);
      ys[i].load(y_row + col);
    } else {
      dys[i].zero();
      ys[i].zero();
    }
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i)
#pragma unroll
    for (int j = 0; j < kVec; ++j) local_dot += dys[i].get(j) * ys[i].get(j);
  const float dot = row_sum<kWarpRows>(local_dot, scratch);

  T* dx_row = dx + row * sk;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int v = lane + i * width;
    if (v >= vecs) continue;
    Pack<T, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.set(j, scale * ys[i].get(j) * (dys[i].get(j) - dot));
    out.store(dx_row + v * kVec);
  }
}

namespace {

void check_scores(const at::Tensor& t, const char* name) {
  check_cuda_contiguous(t, name);
  TORCH_CHECK(t.dim() == 4, name, " must be [batch, heads, queries, keys]");
  const int64_t sk = t.size(3);
  TORCH_CHECK(sk % 8 == 0 && sk <= max_softmax_keys(), "keys must be a multiple of 8 up to ",
              text(max_softmax_keys()), ", got ", text(sk));
  TORCH_CHECK(t.numel() / sk <= INT32_MAX, "too many rows");
  TORCH_CHECK(t.size(1) <= INT32_MAX && t.size(2) <= INT32_MAX, "dims too large");
}

}  // namespace

at::Tensor softmax_forward(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale,
                           bool causal) {
  check_scores(scores, "scores");
  const int64_t b = scores.size(0), h = scores.size(1), sq = scores.size(2), sk = scores.size(3);
  const bool has_mask = mask.has_value() && mask->defined();
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;
  if (has_mask) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.is_cuda() && m.scalar_type() == at::kBool, "mask must be a CUDA bool tensor");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == b && m.size(1) == h && m.size(2) == sq && m.size(3) == sk,
                "mask must be expanded to the scores' shape");
    TORCH_CHECK(m.stride(3) == 1, "mask must be contiguous along keys");
    stride_b = m.stride(0);
    stride_h = m.stride(1);
    stride_q = m.stride(2);
    // 8-byte mask loads need every row start 8-byte aligned.
    TORCH_CHECK(stride_b % 8 == 0 && stride_h % 8 == 0 && stride_q % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(m.data_ptr()) % 8 == 0,
                "mask strides and address must be multiples of 8 bytes");
  }
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor y = at::empty_like(scores);
  const int64_t rows = b * h * sq;
  if (rows == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(scores.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kMaxItems = max_items_for<T>(max_softmax_keys());
    auto launch = [&](const RowLayout& layout, auto items, auto warp_rows) {
      softmax_forward_kernel<T, decltype(items)::value, decltype(warp_rows)::value>
          <<<row_grid(layout, rows), row_block(layout), 0, stream>>>(
              ptr<T>(scores), has_mask ? ptr<uint8_t>(*mask) : nullptr, stride_b, stride_h, stride_q, ptr<T>(y),
              rows, static_cast<int>(h), static_cast<int>(sq), static_cast<int>(sk), static_cast<float>(scale),
              causal);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Two vectors a thread where a block owns a row: 2048 bf16 keys ran at 82% of copy over
    // 128 threads against 75% over 64 (docs/benchmarks.md).
    TORCH_CHECK((dispatch_row_layout<kMaxItems, 2>(sk / vec_elems<T>(), launch)), "no launch layout for ", text(sk),
                " keys");
  });
  return y;
}

at::Tensor softmax_backward(const at::Tensor& dy, const at::Tensor& y, double scale, bool causal) {
  check_scores(y, "y");
  check_cuda_contiguous(dy, "dy");
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(), "dy must match y");
  const int64_t sq = y.size(2), sk = y.size(3);
  const int64_t rows = y.numel() / sk;
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  if (rows == 0) return dx;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kMaxItems = max_items_for<T>(max_softmax_keys());
    auto launch = [&](const RowLayout& layout, auto items, auto warp_rows) {
      softmax_backward_kernel<T, decltype(items)::value, decltype(warp_rows)::value>
          <<<row_grid(layout, rows), row_block(layout), 0, stream>>>(
              ptr<T>(dy), ptr<T>(y), ptr<T>(dx), rows, static_cast<int>(sq), static_cast<int>(sk),
              static_cast<float>(scale), causal);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    TORCH_CHECK(dispatch_row_layout<kMaxItems>(sk / vec_elems<T>(), launch), "no launch layout for ", text(sk), " keys");
  });
  return dx;
}

}  // namespace trellis

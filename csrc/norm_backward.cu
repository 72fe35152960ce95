// Fused RMSNorm / LayerNorm backward: dx, and dweight / dbias without atomics.
//
// A persistent grid of blocks walks the rows (row = group, group + groups, ...). Each thread
// owns fixed columns, so it adds its dweight / dbias contributions into its own slots of a
// per-block fp32 accumulator in shared memory (no races, no barriers in the loop). At the
// end each block writes its column sums as one row of a [blocks, hidden] partial buffer,
// and column_sum_kernel adds the partial rows in a fixed order: the result is the same
// bits on every run (for a given device, since the grid size follows the SM count).
//
//   RMSNorm:   xhat = x * rstd;            dx = rstd * (g - xhat * mean(g * xhat))
//   LayerNorm: xhat = (x - mean) * rstd;   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   with g = dy * weight;  dweight = sum_rows(dy * xhat);  dbias = sum_rows(dy)
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

// dst[0:N] += add[0:N] in shared memory, 16 bytes at a time (dst is 16-byte aligned).
template <int N>
__device__ __forceinline__ void shared_add(float* dst, const float (&add)[N]) {
  float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    float4 v = d[q];
    v.x += add[4 * q];
    v.y += add[4 * q + 1];
    v.z += add[4 * q + 2];
    v.w += add[4 * q + 3];
    d[q] = v;
  }
}

template <int N>
__device__ __forceinline__ void shared_zero(float* dst) {
  float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int q = 0; q < N / 4; ++q) d[q] = make_float4(0.f, 0.f, 0.f, 0.f);
}

template <typename T, typename W, int kItems, bool kWarpRows, bool kRms>
__global__ void __launch_bounds__(kMaxRowThreads) norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, T* __restrict__ dx,
    float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows, int hidden) {
  constexpr int kVec = vec_elems<T>();
  // [dweight | dbias][group in block][hidden], fp32; absent when no weight grad is wanted.
  extern __shared__ float4 accumulators[];
  __shared__ float2 scratch[kWarpSize];

  const bool accumulate = dw_partial != nullptr;
  const bool accumulate_bias = db_partial != nullptr;
  float* acc_w_all = reinterpret_cast<float*>(accumulators);
  float* acc_b_all = acc_w_all + static_cast<int64_t>(blockDim.y) * hidden;
  float* acc_w = acc_w_all + static_cast<int64_t>(threadIdx.y) * hidden;
  float* acc_b = acc_b_all + static_cast<int64_t>(threadIdx.y) * hidden;
  const int lane = threadIdx.x, width = blockDim.x, vecs = hidden / kVec;

  if (accumulate) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = lane + i * width;
      if (v >= vecs) continue;
      shared_zero<kVec>(acc_w + v * kVec);
      if (accumulate_bias) shared_zero<kVec>(acc_b + v * kVec);
    }
  }

  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += groups) {
    const T* dy_row = dy + row * hidden;
    const T* x_row = x + row * hidden;
    Pack<T, kVec> dys[kItems], xs[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = lane + i * width;
      if (v < vecs) {
        dys[i].load(dy_row + v * kVec);
        xs[i].load(x_row + v * kVec);
      } else {
        dys[i].zero();
        xs[i].zero();
      }
    }
    const float mu = kRms ? 0.f : mean_in[row];
    const float rs = rstd_in[row];

    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = lane + i * width;
      if (v >= vecs) continue;
      Pack<W, kVec> w;
      w.load(weight + v * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float g = dys[i].get(j) * w.get(j);
        sum_g += g;
        sum_gx += g * ((xs[i].get(j) - mu) * rs);
      }
    }
    float mean_g = 0.f, mean_gx;
    if constexpr (kRms) {
      mean_gx = row_sum<kWarpRows>(sum_gx, reinterpret_cast<float*>(scratch)) / hidden;
    } else {
      const float2 sums = row_sum2<kWarpRows>(make_float2(sum_g, sum_gx), scratch);
      mean_g = sums.x / hidden;
      mean_gx = sums.y / hidden;
    }

    T* dx_row = dx + row * hidden;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = lane + i * width;
      if (v >= vecs) continue;
      Pack<W, kVec> w;
      w.load(weight + v * kVec);  // second read of the same bytes: an L1 hit
      Pack<T, kVec> out;
      float dw[kVec], db[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = dys[i].get(j);
        const float xhat = (xs[i].get(j) - mu) * rs;
        out.set(j, rs * (d * w.get(j) - xhat * mean_gx - mean_g));
        dw[j] = d * xhat;
        db[j] = d;
      }
      out.store(dx_row + v * kVec);
      if (accumulate) shared_add<kVec>(acc_w + v * kVec, dw);
      if (accumulate_bias) shared_add<kVec>(acc_b + v * kVec, db);
    }
  }

  if (!accumulate) return;  // uniform over the block
  __syncthreads();
  // Add the block's groups in order and write this block's row of partial sums.
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
  const int64_t out_offset = static_cast<int64_t>(blockIdx.x) * hidden;
  for (int c = tid * 4; c < hidden; c += threads * 4) {
    float4 sw = make_float4(0.f, 0.f, 0.f, 0.f), sb = sw;
    for (int g = 0; g < static_cast<int>(blockDim.y); ++g) {
      const float4 a = *reinterpret_cast<const float4*>(acc_w_all + static_cast<int64_t>(g) * hidden + c);
      sw.x += a.x; sw.y += a.y; sw.z += a.z; sw.w += a.w;
      if (accumulate_bias) {
        const float4 b = *reinterpret_cast<const float4*>(acc_b_all + static_cast<int64_t>(g) * hidden + c);
        sb.x += b.x; sb.y += b.y; sb.z += b.z; sb.w += b.w;
      }
    }
    *reinterpret_cast<float4*>(dw_partial + out_offset + c) = sw;
    if (accumulate_bias) *reinterpret_cast<float4*>(db_partial + out_offset + c) = sb;
  }
}

// out[c] = sum over p of partial[p][c], in a fixed order. Block (32, kSumRows): the x
// threads read 32 neighbouring columns (coalesced), the y threads split the parts.
constexpr int kSumRows = 16;

template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ partial, int parts, int hidden, W* __restrict__ out) {
  __shared__ float tile[kSumRows][kWarpSize + 1];
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  float s = 0.f;
  if (c < hidden)
    for (int p = threadIdx.y; p < parts; p += kSumRows) s += partial[static_cast<int64_t>(p) * hidden + c];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < hidden) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kSumRows; ++k) total += tile[k][threadIdx.x];
    out[c] = from_float<W>(total);
  }
}

template <typename W>
void launch_column_sum(const float* partial, int parts, int hidden, W* out, cudaStream_t stream) {
  const dim3 grid((hidden + kWarpSize - 1) / kWarpSize), block(kWarpSize, kSumRows);
  column_sum_kernel<W><<<grid, block, 0, stream>>>(partial, parts, hidden, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks for the persistent grid: as many as fit on the device at once (so every SM stays
// busy), never more than there are row groups. `requested` > 0 overrides (benchmark sweeps).
template <typename Kernel>
int backward_blocks(Kernel kernel, const RowLayout& layout, size_t smem, int64_t rows, int64_t requested, int device) {
  const int64_t needed = (rows + layout.rows_per_block - 1) / layout.rows_per_block;
  if (requested > 0) return static_cast<int>(std::min(requested, needed));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, layout.threads * layout.rows_per_block, smem));
  const int64_t resident = static_cast<int64_t>(device_props(device).multiProcessorCount) * std::max(per_sm, 1);
  return static_cast<int>(std::min(resident, needed));
}

std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
                                      bool rms, bool need_weight_grad, int64_t blocks) {
  check_cuda_contiguous(dy, "dy");
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(weight, "weight");
  check_cuda_contiguous(rstd, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "weight must have hidden (", text(hidden), ") elements");
  TORCH_CHECK(hidden % 8 == 0 && hidden <= max_norm_hidden(), "unsupported hidden size ", text(hidden));
  const int64_t rows = x.numel() / hidden;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat, "rstd must be fp32 [rows]");
  if (!rms) {
    check_cuda_contiguous(mean, "mean");
    TORCH_CHECK(mean.numel() == rows && mean.scalar_type() == at::kFloat, "mean must be fp32 [rows]");
  }
  TORCH_CHECK(!rms || !has_bias, "RMSNorm takes no bias");

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = need_weight_grad ? at::empty_like(weight) : at::empty({0}, weight.options());
  at::Tensor db = need_weight_grad && has_bias ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (rows == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_norm_types(x.scalar_type(), weight.scalar_type(), [&](auto x_tag, auto w_tag) {
    using T = typename decltype(x_tag)::type;
    using W = typename decltype(w_tag)::type;
    constexpr int kMaxItems = max_items_for<T>(max_norm_hidden());
    const RowLayout layout = choose_row_layout(hidden / vec_elems<T>());
    TORCH_CHECK(layout.ok() && layout.items <= kMaxItems, "no launch layout for hidden ", text(hidden));
    dispatch_row_layout<kMaxItems>(layout, [&](auto items, auto warp_rows) {
      constexpr int kItems = decltype(items)::value;
      constexpr bool kWarpRows = decltype(warp_rows)::value;
      auto kernel = rms ? norm_backward_kernel<T, W, kItems, kWarpRows, true>
                        : norm_backward_kernel<T, W, kItems, kWarpRows, false>;
      const int accumulators = need_weight_grad ? (has_bias ? 2 : 1) : 0;
      const size_t smem = static_cast<size_t>(accumulators) * layout.rows_per_block * hidden * sizeof(float);
      TORCH_CHECK(smem <= device_props(device).sharedMemPerBlockOptin, "norm backward needs ", text(static_cast<int64_t>(smem)),
                  " bytes of shared memory");
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      const int grid = backward_blocks(kernel, layout, smem, rows, blocks, device);

      at::Tensor partial;
      float* dw_partial = nullptr;
      float* db_partial = nullptr;
      if (need_weight_grad) {
        partial = at::empty({accumulators, grid, hidden}, x.options().dtype(at::kFloat));
        dw_partial = ptr<float>(partial);
        if (has_bias) db_partial = dw_partial + static_cast<int64_t>(grid) * hidden;
      }
      kernel<<<grid, row_block(layout), smem, stream>>>(
          ptr<T>(dy), ptr<T>(x), ptr<W>(weight), rms ? nullptr : ptr<float>(mean), ptr<float>(rstd), ptr<T>(dx),
          dw_partial, db_partial, rows, static_cast<int>(hidden));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (dw_partial != nullptr) launch_column_sum<W>(dw_partial, grid, static_cast<int>(hidden), ptr<W>(dw), stream);
      if (db_partial != nullptr) launch_column_sum<W>(db_partial, grid, static_cast<int>(hidden), ptr<W>(db), stream);
    });
  });
  return {dx, dw, db};
}

}  // namespace trellis

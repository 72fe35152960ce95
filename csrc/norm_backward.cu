// Fused RMSNorm / LayerNorm backward: dx, and dweight / dbias without atomics.
//
// A persistent grid of blocks walks the rows (row = group, group + groups, ...). Each thread
// owns fixed columns, so it adds its dweight / dbias contributions into its own fp32
// accumulators: registers where they fit beside the row (every layout of 16-bit inputs),
// else its own slots of a per-block shared-memory row (long fp32 rows). No races, no barriers
// in the loop. At the end each row group (registers) or block (shared memory) writes its
// column sums as one row of a [grads, parts, hidden] partial buffer, and one
// column_sum_kernel launch adds the partial rows of both gradients in a fixed order: the
// result is the same bits on every run (for a given device, since the grid size follows the
// SM count).
//
//   RMSNorm:   xhat = x * rstd;            dx = rstd * (g - xhat * mean(g * xhat))
//   LayerNorm: xhat = (x - mean) * rstd;   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   with g = dy * weight;  dweight = sum_rows(dy * xhat);  dbias = sum_rows(dy)
//
// dresidual (optional, x's shape) is added to dx before its one rounding: the gradient that
// reaches x through the residual stream, which autograd would otherwise add in a separate pass
// (read 2, write 1) after this kernel (models/transformer.py's pre-norm layers).
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

// Whether a thread keeps its weight-gradient sums in registers: up to 4 vectors of the row
// (dy and x, 4 registers per 16-byte vector each) and up to 64 sums (one per column and
// gradient), which stays under the 128 registers that 512-thread blocks allow without
// spilling. Longer rows of fp32 (8 vectors a thread) keep them in shared memory.
// On an H200 register sums made the LayerNorm backward 11-17% faster than shared-memory sums
// (each element's read-modify-write of shared memory was the cost), the RMSNorm one up to 3%.
template <typename T>
constexpr bool grads_in_registers(int items, int grads) {
  return items <= 4 && grads * items * vec_elems<T>() <= 64;
}

// A thread's weight- (and bias-) gradient sums over the rows it visits, one per column it owns
// (vector i of the row is v = lane + i * width): registers where grads_in_registers allows,
// else the thread's own slots of its row group's shared-memory rows ([grad][group][hidden]).
// kGrads: 0 (dx only: nothing kept), 1 (dweight), 2 (dweight and dbias; LayerNorm only).
template <typename T, int kItems, int kGrads>
struct GradSums {
  static constexpr int kVec = vec_elems<T>();
  static constexpr bool kInRegisters = grads_in_registers<T>(kItems, kGrads);
  static constexpr int kSlots = kGrads > 0 && kInRegisters ? kGrads : 1;  // array sizes must be positive

  float regs[kSlots][kInRegisters ? kItems : 1][kInRegisters ? kVec : 1];
  float* shared;        // shared-memory sums, all gradients and groups of the block
  int hidden;
  int64_t grad_stride;  // floats from one gradient's rows to the next's

  __device__ __forceinline__ GradSums(float* block_sums, int hidden_size)
      : shared(block_sums), hidden(hidden_size), grad_stride(static_cast<int64_t>(blockDim.y) * hidden_size) {}

  // The thread's vector i is column vector v = lane + i * width of the row (the kernel's rule).
  __device__ __forceinline__ static int vector_of(int i) { return threadIdx.x + i * blockDim.x; }
  __device__ __forceinline__ int vecs() const { return hidden / kVec; }

  __device__ __forceinline__ float* shared_at(int g, int v) const {
    return shared + g * grad_stride + static_cast<int64_t>(threadIdx.y) * hidden + v * kVec;
  }

  __device__ __forceinline__ void zero() {
    if constexpr (kGrads > 0 && kInRegisters) {
#pragma unroll
      for (int g = 0; g < kSlots; ++g)
#pragma unroll
        for (int i = 0; i < kItems; ++i)
#pragma unroll
          for (int j = 0; j < kVec; ++j) regs[g][i][j] = 0.f;
    } else if constexpr (kGrads > 0) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int v = vector_of(i);
        if (v >= vecs()) continue;
#pragma unroll
        for (int g = 0; g < kGrads; ++g) {
          float4* d = reinterpret_cast<float4*>(shared_at(g, v));
#pragma unroll
          for (int q = 0; q < kVec / 4; ++q) d[q] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
    }
  }

  // Adds one row's contributions to vector i (column vector v) of the thread.
  __device__ __forceinline__ void add(int i, int v, const float (&dw)[kVec], const float (&db)[kVec]) {
    if constexpr (kGrads > 0 && kInRegisters) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        regs[0][i][j] += dw[j];
        if constexpr (kGrads == 2) regs[kSlots - 1][i][j] += db[j];
      }
    } else if constexpr (kGrads > 0) {
      add_float4s<kVec>(shared_at(0, v), dw);
      if constexpr (kGrads == 2) add_float4s<kVec>(shared_at(1, v), db);
    }
  }

  // Writes the sums as partial rows of [kGrads, parts, hidden]: one row per row group from
  // registers (parts = groups of the grid), or one per block from shared memory, its groups
  // added in order (parts = blocks).
  __device__ __forceinline__ void write(float* partial) const {
    if constexpr (kGrads > 0 && kInRegisters) {
      const int64_t parts = static_cast<int64_t>(gridDim.x) * blockDim.y;
      const int64_t part = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
      for (int g = 0; g < kSlots; ++g)
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int v = vector_of(i);
          if (v >= vecs()) continue;
          float4* dst = reinterpret_cast<float4*>(partial + (g * parts + part) * hidden + v * kVec);
#pragma unroll
          for (int q = 0; q < kVec / 4; ++q)
            dst[q] = make_float4(regs[g][i][4 * q], regs[g][i][4 * q + 1], regs[g][i][4 * q + 2], regs[g][i][4 * q + 3]);
        }
    } else if constexpr (kGrads > 0) {
      __syncthreads();
      const int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
      const int64_t parts = gridDim.x;
      for (int c = tid * 4; c < hidden; c += threads * 4) {
#pragma unroll
        for (int g = 0; g < kGrads; ++g) {
          float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int r = 0; r < static_cast<int>(blockDim.y); ++r) {
            const float4 a = *reinterpret_cast<const float4*>(shared + g * grad_stride + static_cast<int64_t>(r) * hidden + c);
            s.x += a.x; s.y += a.y; s.z += a.z; s.w += a.w;
          }
          *reinterpret_cast<float4*>(partial + (g * parts + blockIdx.x) * hidden + c) = s;
        }
      }
    }
  }
};

template <typename T, typename W, int kItems, bool kWarpRows, bool kRms, int kGrads>
__global__ void __launch_bounds__(kMaxRowThreads) norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const T* __restrict__ dresidual,
    T* __restrict__ dx, float* __restrict__ partial, int64_t rows, int hidden) {
  constexpr int kVec = vec_elems<T>();
  allow_next_grid_to_start();  // the column sums, which wait for this grid before reading
  extern __shared__ float4 accumulators[];  // shared-memory sums (empty with register sums)
  __shared__ float2 scratch[kWarpSize];
  const int lane = threadIdx.x, width = blockDim.x, vecs = hidden / kVec;
  GradSums<T, kItems, kGrads> sums(reinterpret_cast<float*>(accumulators), hidden);
  sums.zero();

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
      const float2 totals = row_sum2<kWarpRows>(make_float2(sum_g, sum_gx), scratch);
      mean_g = totals.x / hidden;
      mean_gx = totals.y / hidden;
    }

    T* dx_row = dx + row * hidden;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = lane + i * width;
      if (v >= vecs) continue;
      Pack<W, kVec> w;
      w.load(weight + v * kVec);  // second read of the same bytes: an L1 hit
      Pack<T, kVec> out, residual;
      if (dresidual != nullptr) residual.load(dresidual + row * hidden + v * kVec);
      float dw[kVec], db[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = dys[i].get(j);
        const float xhat = (xs[i].get(j) - mu) * rs;
        const float grad = rs * (d * w.get(j) - xhat * mean_gx - mean_g);
        out.set(j, dresidual != nullptr ? grad + residual.get(j) : grad);
        dw[j] = d * xhat;
        db[j] = d;
      }
      out.store(dx_row + v * kVec);
      sums.add(i, v, dw, db);
    }
  }
  sums.write(partial);
}

// Column sums of a [grads, parts, hidden] partial buffer, both gradients in one launch:
// logical column c = g * hidden + h goes to out[g][h] (out_w for g = 0, out_b for g = 1), the
// sum over p of partial[g][p][h] in a fixed order. Block (32, kSumRows): the x threads read
// 32 neighbouring columns (coalesced), the y threads split the parts.
constexpr int kSumRows = 16;

template <typename W>
__global__ void column_sum_kernel(const float* __restrict__ partial, int parts, int hidden, int columns,
                                  W* __restrict__ out_w, W* __restrict__ out_b) {
  wait_for_previous_grid();  // the partial rows are complete and visible
  __shared__ float tile[kSumRows][kWarpSize + 1];
  const int c = blockIdx.x * kWarpSize + threadIdx.x;
  const int g = c < hidden ? 0 : 1, h = c - g * hidden;
  float s = 0.f;
  if (c < columns) {
    const float* column = partial + static_cast<int64_t>(g) * parts * hidden + h;
    for (int p = threadIdx.y; p < parts; p += kSumRows) s += column[static_cast<int64_t>(p) * hidden];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < columns) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kSumRows; ++k) total += tile[k][threadIdx.x];
    (g == 0 ? out_w : out_b)[h] = from_float<W>(total);
  }
}

template <typename W>
void launch_column_sum(const float* partial, int grads, int parts, int hidden, W* out_w, W* out_b, int device,
                       cudaStream_t stream) {
  const int columns = grads * hidden;
  const dim3 grid((columns + kWarpSize - 1) / kWarpSize), block(kWarpSize, kSumRows);
  // On Hopper the launch overlaps the end of the norm backward kernel that writes `partial`.
  launch_kernel(can_overlap_previous(column_sum_kernel<W>, device), grid, block, 0, stream, column_sum_kernel<W>,
                partial, parts, hidden, columns, out_w, out_b);
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
                                      bool rms, bool need_weight_grad, const c10::optional<at::Tensor>& dresidual,
                                      int64_t blocks) {
  check_cuda_contiguous(dy, "dy");
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(weight, "weight");
  check_cuda_contiguous(rstd, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x");
  const bool adds_residual = dresidual.has_value() && dresidual->defined();
  if (adds_residual) {
    check_cuda_contiguous(*dresidual, "dresidual");
    TORCH_CHECK(dresidual->sizes() == x.sizes() && dresidual->scalar_type() == x.scalar_type(),
                "dresidual must match x");
  }
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
    // The launcher for one kind (RMSNorm or LayerNorm) and gradient count, so each dispatch
    // below instantiates that kind's kernels only.
    auto launcher = [&](auto rms_tag, auto grads_tag) {
      return [&, rms_tag, grads_tag](const RowLayout& layout, auto items, auto warp_rows) {
        constexpr int kItems = decltype(items)::value;
        constexpr bool kRms = decltype(rms_tag)::value;
        constexpr int kGrads = decltype(grads_tag)::value;
        constexpr bool kInRegisters = grads_in_registers<T>(kItems, kGrads);
        auto kernel = norm_backward_kernel<T, W, kItems, decltype(warp_rows)::value, kRms, kGrads>;
        const int64_t smem = kInRegisters ? 0 : static_cast<int64_t>(kGrads) * layout.rows_per_block * hidden * sizeof(float);
        TORCH_CHECK(smem <= static_cast<int64_t>(device_props(device).sharedMemPerBlockOptin), "norm backward needs ",
                    text(smem), " bytes of shared memory");
        if (smem > 48 * 1024)
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        const int grid = backward_blocks(kernel, layout, smem, rows, blocks, device);
        const int parts = kInRegisters ? grid * layout.rows_per_block : grid;
        at::Tensor partial;
        if (kGrads > 0) partial = at::empty({kGrads, parts, hidden}, x.options().dtype(at::kFloat));
        kernel<<<grid, row_block(layout), smem, stream>>>(
            ptr<T>(dy), ptr<T>(x), ptr<W>(weight), kRms ? nullptr : ptr<float>(mean), ptr<float>(rstd),
            optional_ptr<T>(dresidual), ptr<T>(dx),
            kGrads > 0 ? ptr<float>(partial) : nullptr, rows, static_cast<int>(hidden));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (kGrads > 0)
          launch_column_sum<W>(ptr<float>(partial), kGrads, parts, static_cast<int>(hidden), ptr<W>(dw),
                               kGrads == 2 ? ptr<W>(db) : nullptr, device, stream);
      };
    };
    // Measured on an H200 (docs/benchmarks.md): with at most one sum per column (RMSNorm, or a
    // LayerNorm without bias or with frozen weights) 2 vectors a thread over twice the threads ran
    // 2-10% faster in bf16 (level in fp32); the LayerNorm backward with two sums per column in
    // 128 registers keeps 4 (so 4 blocks of 128 threads fit an SM at hidden 4096): with 2 it ran
    // 3-22% slower.
    const int64_t vecs = hidden / vec_elems<T>();
    auto dispatch = [&](auto rms_tag, auto grads_tag) {
      constexpr int kBlockItems = decltype(rms_tag)::value || decltype(grads_tag)::value < 2 ? 2 : 4;
      return dispatch_row_layout<kMaxItems, kBlockItems>(vecs, launcher(rms_tag, grads_tag));
    };
    using std::integral_constant;
    const int grads = need_weight_grad ? (has_bias ? 2 : 1) : 0;
    bool launched;
    if (rms && grads == 0) launched = dispatch(std::true_type{}, integral_constant<int, 0>{});
    else if (rms) launched = dispatch(std::true_type{}, integral_constant<int, 1>{});
    else if (grads == 0) launched = dispatch(std::false_type{}, integral_constant<int, 0>{});
    else if (grads == 1) launched = dispatch(std::false_type{}, integral_constant<int, 1>{});
    else launched = dispatch(std::false_type{}, integral_constant<int, 2>{});
    TORCH_CHECK(launched, "no launch layout for hidden ", text(hidden));
  });
  return {dx, dw, db};
}

}  // namespace trellis

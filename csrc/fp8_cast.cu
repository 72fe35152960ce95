// FP8 quantisation for parallel/fp8.py: the amax of a tensor, and one pass that scales a 2-D
// tensor, casts it to e4m3 or e5m2 and writes it in both layouts (row-major and transposed),
// since Hopper's FP8 GEMMs read each operand K-major and the backward GEMMs need the other
// layout. The math matches the torch reference (parallel/fp8.quantize_both_layouts) bit for
// bit: scale = max * (1 / max(amax, 1e-12)) and x * scale in fp32, rounded to nearest and saturated
// to the format's largest finite value. (Bit for bit while 1 / amax is a normal float, i.e.
// amax below 2^126: the build flushes subnormals.)
#include <cuda_fp8.h>

#include <algorithm>

#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {
namespace {

constexpr int kAmaxThreads = 512;
constexpr int kTile = 64;             // a block quantises a 64 x 64 tile
constexpr int kCastThreads = 256;
constexpr int kTilePitch = kTile + 4; // bytes per shared-memory tile row (4-byte aligned, fewer bank conflicts)

// Max that keeps NaN (as torch's amax does), so a NaN anywhere reaches the scale and the
// step's non-finite checks.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Non-negative floats (and a NaN with its sign bit cleared, above all of them) order like
// their bit patterns read as ints, so an integer atomicMax is a float max here.
__device__ __forceinline__ void atomic_max_nonnegative(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ amax) {
  constexpr int kVec = vec_elems<T>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float local = 0.f;
  for (int64_t v = first; v < n / kVec; v += stride) {
    Pack<T, kVec> pack;
    pack.load(x + v * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) local = nan_max(local, fabsf(pack.get(i)));
  }
  for (int64_t i = n / kVec * kVec + first; i < n; i += stride) local = nan_max(local, fabsf(to_float(x[i])));
  __shared__ float warp_maxima[kAmaxThreads / kWarpSize];
  local = warp_nan_max(local);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_maxima[warp] = local;
  __syncthreads();
  if (warp == 0) {
    local = lane < blockDim.x / kWarpSize ? warp_maxima[lane] : 0.f;
    local = warp_nan_max(local);
    if (lane == 0) atomic_max_nonnegative(amax, local);
  }
}

template <__nv_fp8_interpretation_t kFormat>
__device__ __forceinline__ uint16_t to_fp8x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, kFormat);
}

// Grid: (row tiles, column tiles). Rows and columns are multiples of 16 (the host checks), so
// every 16-byte input vector and every 16-row run of the transposed output is whole.
template <typename T, __nv_fp8_interpretation_t kFormat>
__global__ void cast_transpose_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                                      const float* __restrict__ amax, float fp8_max,
                                      uint8_t* __restrict__ out, uint8_t* __restrict__ out_t,
                                      float* __restrict__ inverse_scale) {
  constexpr int kVec = vec_elems<T>();
  constexpr int kRowVecs = kTile / kVec;
  __shared__ __align__(16) uint8_t tile[kTile * kTilePitch];
  const float clamped = *amax < 1e-12f ? 1e-12f : *amax;  // a NaN amax stays NaN
  // As torch evaluates the reference's `max / amax` (a Python number over a tensor): the
  // reciprocal, then the product, each rounded.
  const float scale = __fmul_rn(__frcp_rn(clamped), fp8_max);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *inverse_scale = __frcp_rn(scale);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile, col0 = static_cast<int64_t>(blockIdx.y) * kTile;

  // Row-major pass: each thread takes whole 16-byte vectors of the tile.
  for (int v = threadIdx.x; v < kTile * kRowVecs; v += kCastThreads) {
    const int r = v / kRowVecs, c = (v % kRowVecs) * kVec;
    if (row0 + r >= rows || col0 + c >= cols) continue;
    Pack<T, kVec> pack;
    pack.load(x + (row0 + r) * cols + col0 + c);
    uint32_t words[kVec / 4];
#pragma unroll
    for (int w = 0; w < kVec / 4; ++w) {
      const uint32_t low = to_fp8x2<kFormat>(pack.get(4 * w) * scale, pack.get(4 * w + 1) * scale);
      const uint32_t high = to_fp8x2<kFormat>(pack.get(4 * w + 2) * scale, pack.get(4 * w + 3) * scale);
      words[w] = low | (high << 16);
      *reinterpret_cast<uint32_t*>(tile + r * kTilePitch + c + 4 * w) = words[w];
    }
    uint8_t* dst = out + (row0 + r) * cols + col0 + c;
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = words[0];
    }
  }
  __syncthreads();

  // Transposed pass: out_t[col][row0 .. row0 + 63], 16 bytes (16 rows) per thread.
  constexpr int kRuns = kTile / 16;
  for (int t = threadIdx.x; t < kTile * kRuns; t += kCastThreads) {
    const int c = t / kRuns, r = (t % kRuns) * 16;
    if (col0 + c >= cols || row0 + r >= rows) continue;
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) word |= static_cast<uint32_t>(tile[(r + 4 * w + b) * kTilePitch + c]) << (8 * b);
      words[w] = word;
    }
    *reinterpret_cast<uint4*>(out_t + (col0 + c) * rows + row0 + r) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

int amax_blocks(int64_t vectors, int device) {
  const int64_t wanted = (vectors + kAmaxThreads - 1) / kAmaxThreads;
  const int64_t limit = 4LL * device_props(device).multiProcessorCount;  // enough to fill the device
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, limit)));
}

}  // namespace

at::Tensor fp8_amax(const at::Tensor& x) {
  check_cuda_contiguous(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto amax = at::zeros({1}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return amax;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int blocks = amax_blocks(x.numel() / vec_elems<T>(), x.get_device());
    amax_kernel<T><<<blocks, kAmaxThreads, 0, stream>>>(ptr<T>(x), x.numel(), ptr<float>(amax));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return amax;
}

std::vector<at::Tensor> fp8_cast_transpose(const at::Tensor& x, const at::Tensor& amax, bool e5m2) {
  check_cuda_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2, "fp8_cast_transpose takes a 2-D tensor, got ", text(x.dim()), " dims");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(rows % 16 == 0 && cols % 16 == 0, "fp8_cast_transpose needs both sizes multiples of 16, got ",
              text(rows), " x ", text(cols));
  TORCH_CHECK(amax.is_cuda() && amax.scalar_type() == at::kFloat && amax.numel() == 1,
              "amax must be one float32 on the GPU");
  TORCH_CHECK(amax.get_device() == x.get_device(), "amax must be on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fp8_type = e5m2 ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn;
  auto out = at::empty({rows, cols}, x.options().dtype(fp8_type));
  auto out_t = at::empty({cols, rows}, x.options().dtype(fp8_type));
  auto inverse = at::empty({}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, out_t, inverse.fill_(1.0)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile), static_cast<unsigned>((cols + kTile - 1) / kTile));
  TORCH_CHECK(grid.y <= 65535, "fp8_cast_transpose: too many columns (", text(cols), ")");
  const float fp8_max = e5m2 ? 57344.f : 448.f;
  const float* amax_ptr = ptr<float>(amax);
  dispatch_float_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kCastThreads, 0, stream>>>(ptr<T>(x), rows, cols, amax_ptr, fp8_max, ptr<uint8_t>(out),
                                                ptr<uint8_t>(out_t), ptr<float>(inverse));
    };
    if (e5m2) {
      launch(cast_transpose_kernel<T, __NV_E5M2>);
    } else {
      launch(cast_transpose_kernel<T, __NV_E4M3>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, out_t, inverse};
}

}  // namespace trellis

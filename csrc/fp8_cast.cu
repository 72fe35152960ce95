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
// A block quantises a square tile of 16-bit inputs 128 wide: each fp8 row it writes (in both
// layouts) is then a whole 128-byte line. On an H200 this and the word-wise transpose below
// took the bf16 cast from 78-80% to 84-85% of copy against 64 x 64 tiles read back byte by
// byte. fp32 inputs keep 64 x 64 tiles: 128-wide ones (twice the bytes a tile) gained nothing.
template <typename T>
struct CastTile {
  static constexpr int kSize = sizeof(T) == 4 ? 64 : 128;
  static constexpr int kThreads = kSize == 128 ? 512 : 256;  // 4 input vectors a thread
  static constexpr int kPitch = kSize + 4;                 // bytes per shared-memory row (4-byte aligned, fewer bank conflicts)
};

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

// 16-byte loads in flight per thread: 4 for 16-bit inputs (3% faster on an H200), 1 for fp32
// (there 4 ran 7% slower).
template <typename T>
constexpr int amax_unroll() { return sizeof(T) == 4 ? 1 : 4; }

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ amax) {
  constexpr int kVec = vec_elems<T>(), kAmaxUnroll = amax_unroll<T>();
  allow_next_grid_to_start();  // the cast, which waits for this grid before it reads the amax
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t vectors = n / kVec;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t v = first;
  float local = 0.f;
  for (; v + (kAmaxUnroll - 1) * stride < vectors; v += kAmaxUnroll * stride) {
    Pack<T, kVec> packs[kAmaxUnroll];
#pragma unroll
    for (int u = 0; u < kAmaxUnroll; ++u) packs[u].load(x + (v + u * stride) * kVec);
#pragma unroll
    for (int u = 0; u < kAmaxUnroll; ++u)
#pragma unroll
      for (int i = 0; i < kVec; ++i) local = nan_max(local, fabsf(packs[u].get(i)));
  }
  for (; v < vectors; v += stride) {
    Pack<T, kVec> pack;
    pack.load(x + v * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) local = nan_max(local, fabsf(pack.get(i)));
  }
  for (int64_t i = vectors * kVec + first; i < n; i += stride) local = nan_max(local, fabsf(to_float(x[i])));
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

// 16 rows x 4 columns of fp8 bytes (sixteen 32-bit words, 4 columns each, read down the rows)
// turned into 4 columns x 16 rows: out[j] holds column j's 16 bytes, top row first.
__device__ __forceinline__ void transpose_16x4(const uint32_t (&rows)[16], uint4 (&out)[4]) {
  uint32_t columns[4][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t a = rows[4 * q], b = rows[4 * q + 1], c = rows[4 * q + 2], d = rows[4 * q + 3];
    const uint32_t ab_low = __byte_perm(a, b, 0x5140), ab_high = __byte_perm(a, b, 0x7362);  // a0 b0 a1 b1 | a2 b2 a3 b3
    const uint32_t cd_low = __byte_perm(c, d, 0x5140), cd_high = __byte_perm(c, d, 0x7362);
    columns[0][q] = __byte_perm(ab_low, cd_low, 0x5410);  // a0 b0 c0 d0
    columns[1][q] = __byte_perm(ab_low, cd_low, 0x7632);  // a1 b1 c1 d1
    columns[2][q] = __byte_perm(ab_high, cd_high, 0x5410);
    columns[3][q] = __byte_perm(ab_high, cd_high, 0x7632);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = make_uint4(columns[j][0], columns[j][1], columns[j][2], columns[j][3]);
}

// Grid: (row tiles, column tiles). Rows and columns are multiples of 16 (the host checks), so
// every 16-byte input vector and every 16-row run of the transposed output is whole.
template <typename T, __nv_fp8_interpretation_t kFormat>
__global__ void __launch_bounds__(CastTile<T>::kThreads, 1024 / CastTile<T>::kThreads) cast_transpose_kernel(
    const T* __restrict__ x, int64_t rows, int64_t cols, const float* __restrict__ amax, float fp8_max,
    uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, float* __restrict__ inverse_scale) {
  constexpr int kVec = vec_elems<T>();
  constexpr int kTile = CastTile<T>::kSize, kCastThreads = CastTile<T>::kThreads, kTilePitch = CastTile<T>::kPitch;
  constexpr int kRowVecs = kTile / kVec;
  constexpr int kLoads = kTile * kRowVecs / kCastThreads;  // input vectors per thread
  __shared__ __align__(16) uint8_t tile[kTile * kTilePitch];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile, col0 = static_cast<int64_t>(blockIdx.y) * kTile;

  // Everything below may depend on the kernel before (the amax; x too, whatever wrote it).
  wait_for_previous_grid();
  const float clamped = *amax < 1e-12f ? 1e-12f : *amax;  // a NaN amax stays NaN
  // As torch evaluates the reference's `max / amax` (a Python number over a tensor): the
  // reciprocal, then the product, each rounded.
  const float scale = __fmul_rn(__frcp_rn(clamped), fp8_max);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *inverse_scale = __frcp_rn(scale);

  // Row-major pass: each thread takes whole 16-byte vectors of the tile, loading a batch of 4
  // (16 registers) before converting any.
  constexpr int kBatch = kLoads < 4 ? kLoads : 4;
  // The thread's vector k sits at tile row .x, tile column .y; false where it is past x's edge.
  auto place = [](int k) {
    const int v = threadIdx.x + k * kCastThreads;
    return make_int2(v / kRowVecs, (v % kRowVecs) * kVec);
  };
  auto inside = [&](int2 at) { return row0 + at.x < rows && col0 + at.y < cols; };
#pragma unroll 1  // (unrolled, fp32's two batches would load together and spill)
  for (int k0 = 0; k0 < kLoads; k0 += kBatch) {
    Pack<T, kVec> packs[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int2 at = place(k0 + k);
      if (inside(at)) packs[k].load(x + (row0 + at.x) * cols + col0 + at.y);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int2 at = place(k0 + k);
      if (!inside(at)) continue;
      const int r = at.x, c = at.y;
      uint32_t words[kVec / 4];
#pragma unroll
      for (int w = 0; w < kVec / 4; ++w) {
        const uint32_t low = to_fp8x2<kFormat>(packs[k].get(4 * w) * scale, packs[k].get(4 * w + 1) * scale);
        const uint32_t high = to_fp8x2<kFormat>(packs[k].get(4 * w + 2) * scale, packs[k].get(4 * w + 3) * scale);
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
  }
  __syncthreads();

  // Transposed pass: a unit is 4 columns x 16 rows, read as 16 shared-memory words and written
  // as 4 x 16 bytes of out_t. The 32 lanes of a warp take 16 neighbouring column groups x 2
  // neighbouring row runs: the reads hit 32 different banks and each column's two runs fill
  // one 32-byte sector.
  constexpr int kGroups = kTile / 4, kRuns = kTile / 16;
  for (int u = threadIdx.x; u < kGroups * kRuns; u += kCastThreads) {
    const int run = (u / (2 * kGroups)) * 2 + u % 2, c = ((u / 2) % kGroups) * 4, r = run * 16;
    if (col0 + c >= cols || row0 + r >= rows) continue;  // cols % 16 == 0: all 4 columns exist
    uint32_t words[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) words[k] = *reinterpret_cast<const uint32_t*>(tile + (r + k) * kTilePitch + c);
    uint4 columns[4];
    transpose_16x4(words, columns);
#pragma unroll
    for (int j = 0; j < 4; ++j) *reinterpret_cast<uint4*>(out_t + (col0 + c + j) * rows + row0 + r) = columns[j];
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
  const float fp8_max = e5m2 ? 57344.f : 448.f;
  const float* amax_ptr = ptr<float>(amax);
  dispatch_float_type(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kTile = CastTile<T>::kSize;
    const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile), static_cast<unsigned>((cols + kTile - 1) / kTile));
    TORCH_CHECK(grid.y <= 65535, "fp8_cast_transpose: too many columns (", text(cols), ")");
    // On Hopper the launch overlaps the end of the kernel before it (usually the amax).
    auto launch = [&](auto kernel) {
      launch_kernel(can_overlap_previous(kernel, x.get_device()), grid, dim3(CastTile<T>::kThreads), 0, stream, kernel,
                    ptr<T>(x), rows, cols, amax_ptr, fp8_max, ptr<uint8_t>(out), ptr<uint8_t>(out_t),
                    ptr<float>(inverse));
    };
    if (e5m2) {
      launch(cast_transpose_kernel<T, __NV_E5M2>);
    } else {
      launch(cast_transpose_kernel<T, __NV_E4M3>);
    }
  });
  return {out, out_t, inverse};
}

}  // namespace trellis

// Shared pieces of Trellis' row-wise CUDA kernels (norms and softmax).
//
// Every kernel here works on rows: a row is owned by one "group" of threads, which is a
// single warp for short rows (several rows per block) or the whole block for long rows
// (one row per block). Each thread of a group owns `kItems` 16-byte vectors of the row,
// vector indices lane, lane + width, lane + 2*width, ... so that consecutive threads touch
// consecutive 16-byte chunks (coalesced) and a thread owns the same columns in every row
// (which lets the norm backward accumulate weight gradients per column without atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace trellis {

constexpr int kWarpSize = 32;
// Largest number of threads in a group (block) that owns one row. The backward kernels
// hold two row slices in registers; 512 threads leaves them up to 128 registers each.
constexpr int kMaxRowThreads = 512;
// Rows per block when a warp owns a row.
constexpr int kWarpRowsPerBlock = 4;

// ---------------------------------------------------------------- element conversion
// Explicit intrinsics only: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// friends, so the implicit conversions of __half / __nv_bfloat16 are not available.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T per 16-byte vector: 8 for bf16/fp16, 4 for fp32.
template <typename T>
constexpr int vec_elems() { return 16 / static_cast<int>(sizeof(T)); }

// dst[0:N] += add[0:N], 16 bytes at a time (dst 16-byte aligned, in shared or global memory).
template <int N>
__device__ __forceinline__ void add_float4s(float* dst, const float (&add)[N]) {
  static_assert(N % 4 == 0, "whole 16-byte vectors only");
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

// ---------------------------------------------------------------- packed vectors
// N elements of T held as raw 16-byte chunks, so that 16-bit data costs half a register
// per element while it waits in registers, and every global access is a 128-bit one.
template <typename T, int N>
struct Pack {
  static_assert((sizeof(T) * N) % 16 == 0, "a pack is made of whole 16-byte chunks");
  static constexpr int kChunks = static_cast<int>(sizeof(T)) * N / 16;
  uint4 chunk[kChunks];

  __device__ __forceinline__ void load(const T* src) {
    const uint4* p = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = p[c];
  }
  __device__ __forceinline__ void store(T* dst) const {
    uint4* p = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) p[c] = chunk[c];
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = make_uint4(0u, 0u, 0u, 0u);
  }
  // `i` must be a compile-time constant after unrolling, or the pack leaves registers.
  __device__ __forceinline__ float get(int i) const {
    return to_float(reinterpret_cast<const T*>(chunk)[i]);
  }
  __device__ __forceinline__ void set(int i, float v) {
    reinterpret_cast<T*>(chunk)[i] = from_float<T>(v);
  }
};

// N mask bytes (one bool per element) read with a single 4- or 8-byte load.
template <int N>
struct MaskBytes {
  static_assert(N == 4 || N == 8, "mask vectors are 4 or 8 bytes");
  using Word = typename std::conditional<N == 8, unsigned long long, unsigned int>::type;
  Word bits;
  __device__ __forceinline__ void load(const uint8_t* src) {
    bits = *reinterpret_cast<const Word*>(src);
  }
  __device__ __forceinline__ bool get(int i) const { return ((bits >> (8 * i)) & 0xffu) != 0; }
};

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The xor butterfly leaves the bitwise-same total in every lane (a+b == b+a in IEEE), and
// the order of additions is fixed, so all reductions here are deterministic.

// Sum over the threads that own one row. With kWarpRows the row is one warp's; otherwise
// it is the whole block's and `scratch` (kWarpSize floats of shared memory) carries the
// per-warp totals. Every thread of the block must call it (it synchronises the block).
// kScratchReused false: the block's last use of `scratch` (no later reduction, no next row),
// which skips the second barrier, there only to keep a fast warp's next write from landing
// before a slow warp has read this total. Alone it did not change the RMSNorm forward's time
// measurably; the forward was measured and kept with it (docs/benchmarks.md, fourteenth
// H200 section).
template <bool kWarpRows, bool kScratchReused = true>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (kWarpRows) {
    return v;
  } else {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.f;
    total = warp_sum(total);
    if constexpr (kScratchReused) __syncthreads();  // the next reduction may overwrite scratch
    return total;
  }
}

template <bool kWarpRows>
__device__ __forceinline__ float row_max(float v, float* scratch) {
  v = warp_max(v);
  if constexpr (kWarpRows) {
    return v;
  } else {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : -INFINITY;
    total = warp_max(total);
    __syncthreads();
    return total;
  }
}

// Two sums in one pass (one pair of block barriers instead of two).
template <bool kWarpRows>
__device__ __forceinline__ float2 row_sum2(float2 v, float2* scratch) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if constexpr (kWarpRows) {
    return v;
  } else {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float2 total = lane < warps ? scratch[lane] : make_float2(0.f, 0.f);
    total.x = warp_sum(total.x);
    total.y = warp_sum(total.y);
    __syncthreads();
    return total;
  }
}

// ---------------------------------------------------------------- launch geometry
// How a row of `vecs` 16-byte vectors is spread over threads.
struct RowLayout {
  int items = 0;          // vectors per thread (compile-time in the kernels)
  bool warp_rows = true;  // a warp owns a row (else the block does)
  int threads = 0;        // threads per row group (blockDim.x)
  int rows_per_block = 1; // blockDim.y
  bool ok() const { return items > 0; }
};

// `block_items` (2 or 4) is the vectors per thread where a block owns a row: 2 spreads a row
// over twice the threads, which pays where a kernel's registers per row are few (measured per
// kernel on an H200, docs/benchmarks.md); longer rows take 4, then 8.
inline RowLayout choose_row_layout(int64_t vecs, int block_items = 4) {
  auto round_up_warp = [](int64_t n) { return static_cast<int>((n + kWarpSize - 1) / kWarpSize * kWarpSize); };
  RowLayout layout;
  if (vecs <= 0) return layout;
  if (vecs <= 32) return {1, true, kWarpSize, kWarpRowsPerBlock};
  if (vecs <= 64) return {2, true, kWarpSize, kWarpRowsPerBlock};
  if (vecs <= 128) return {4, true, kWarpSize, kWarpRowsPerBlock};
  for (const int items : {block_items, 4, 8})
    if (items >= block_items && vecs <= static_cast<int64_t>(items) * kMaxRowThreads)
      return {items, false, round_up_warp((vecs + items - 1) / items), 1};
  return layout;  // too long (the Python side checks support first and uses the torch reference)
}

// Longest supported row, in elements of a type of `elem_size` bytes.
inline int64_t max_row_elems(int elem_size) { return 8LL * kMaxRowThreads * (16 / elem_size); }

// Vectors per thread needed for the longest row of `max_elems` elements of type T; layouts
// with more are never chosen for T, so they are not instantiated (compile time, registers).
template <typename T>
constexpr int max_items_for(int64_t max_elems) {
  return static_cast<int>((max_elems / vec_elems<T>() + kMaxRowThreads - 1) / kMaxRowThreads);
}

// Chooses the layout of a row of `vecs` 16-byte vectors (choose_row_layout with kBlockItems)
// and calls f(layout, std::integral_constant<int, ITEMS>, std::bool_constant<WARP_ROWS>) with
// it. Returns false, calling nothing, where no instance serves the row: too long for the layout
// rule, or more vectors a thread than kMaxItems (the longest row the kernel supports). The
// layout and the instances come from the one kBlockItems, so they cannot disagree.
template <int kMaxItems, int kBlockItems = 4, typename F>
[[nodiscard]] bool dispatch_row_layout(int64_t vecs, F&& f) {
  static_assert(kBlockItems == 2 || kBlockItems == 4, "block rows take 2 or 4 vectors a thread first");
  using std::integral_constant;
  const RowLayout layout = choose_row_layout(vecs, kBlockItems);
  if (!layout.ok() || layout.items > kMaxItems) return false;
  if (layout.warp_rows) {
    switch (layout.items) {
      case 1: f(layout, integral_constant<int, 1>{}, std::true_type{}); return true;
      case 2: f(layout, integral_constant<int, 2>{}, std::true_type{}); return true;
      case 4: f(layout, integral_constant<int, 4>{}, std::true_type{}); return true;
    }
    return false;
  }
  if constexpr (kBlockItems == 2) {
    if (layout.items == 2) {
      f(layout, integral_constant<int, 2>{}, std::false_type{});
      return true;
    }
  }
  if (layout.items == 4) {
    f(layout, integral_constant<int, 4>{}, std::false_type{});
    return true;
  }
  if constexpr (kMaxItems >= 8) {
    if (layout.items == 8) {
      f(layout, integral_constant<int, 8>{}, std::false_type{});
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- programmatic dependent launch
// A kernel launched to overlap the one before it (launch_kernel with overlap, kernel_host.h)
// waits here for that grid to finish and its writes to be visible. A no-op below compute
// capability 9.0, where such launches are never made.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the kernel after this one in the stream, if launched to overlap, start now: its blocks
// take SMs as this grid's blocks leave, and wait in wait_for_previous_grid().
__device__ __forceinline__ void allow_next_grid_to_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

template <typename T>
struct TypeTag {
  using type = T;
};

}  // namespace trellis

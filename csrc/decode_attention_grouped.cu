// Decode attention for grouped heads (G = 2..8 query heads a kv head) on tensor cores.
//
// Why: with G query heads sharing each key and value, a decode step does G dot products per
// key read. On CUDA cores that work (and its lane reductions) outweighed the memory saved:
// the forms timed on an H200 ran at 0.43-0.84x SDPA's speed over a full cache
// (docs/benchmarks.md). Here the G heads are the rows of a 16 x 8 x 16 mma.sync: scores
// S[G x 8 keys] = Q[G x 16 d] . K^T, and out[G x 8 d] += P[G x 16 keys] . V[16 keys x 8 d], with
// rows G..15 zero. The kernel stays memory-bound and reads each filled slot once.
//
// Fragments come straight from global memory in 16-byte loads, with no shared-memory staging:
// - q.k sums over d, so d may be permuted as long as q and k agree. Lane (g, t) (g = lane / 4,
//   t = lane % 4) loads 8 consecutive d of q's row g and of key g, at 32 * c + 8 * t; words 0,1
//   of the load are the fragment halves of k-step 0 and words 2,3 those of k-step 1. So each
//   32-wide slice of d is two mma k-steps, and q's A fragment uses the same d as k's B fragment.
// - The score fragment a lane holds (row g, keys 2t, 2t+1 of two 8-key groups) is exactly the
//   A fragment of p.v for those 16 keys, so probabilities never leave registers.
// - p.v's B fragment wants two keys at one d. Lane (g, t) loads 8 consecutive d (at 64h + 8g)
//   of each of its four keys and pairs the keys' elements with byte permutes; mma i of a
//   64-wide slice h then computes output columns 64h + 8n + i (n = 0..7), which the epilogue
//   puts back in order.
// Keys past the fill mark are never loaded; hidden keys' values are zeroed so that a 0 weight
// never meets a NaN. Block (split, kv head, row): four warps take 16-key steps in turn over the
// block's chunk (32-key steps at head dim 64), each keeping a running max and sum per head in the
// log2 domain, merged through shared memory at the end and across splits by
// csrc/decode_attention.cu's merge kernel.
//
// Each warp double-buffers its steps in registers: the next step's loads are in flight while the
// current one is folded in. It costs registers (two blocks an SM), so grouped_decode_splits sizes
// the grid from the occupancy: fewer, longer chunks than the one-kv-head kernel takes. The two
// together took a full llama3-8b-shaped cache on an H200 from 2.5 to 3.5 TB/s.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "decode_attention.h"
#include "kernel_host.h"

namespace trellis {
namespace {

constexpr int kGroupedWarps = 4;

// One m16n8k16 product, c += A . B, for A's rows 0..7: c holds row g's two columns, and a1 = a3 =
// 0 (rows 8..15 are empty; their outputs are zero in, zero out, and dead at once, so no
// registers are kept for them).
#define TRELLIS_MMA_ROWS_0_7(TYPE)                                                                     \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
      "{%0,%1,%10,%10};\n"                                                                             \
      : "+f"(c[0]), "+f"(c[1]), "=f"(empty2), "=f"(empty3)                                               \
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f))

template <typename T>
__device__ __forceinline__ void mma_rows_0_7(float (&c)[2], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  float empty2, empty3;
  if constexpr (std::is_same<T, __half>::value) {
    TRELLIS_MMA_ROWS_0_7("f16");
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "tensor-core decode takes bf16 or fp16");
    TRELLIS_MMA_ROWS_0_7("bf16");
  }
}
#undef TRELLIS_MMA_ROWS_0_7

// Two floats as one register of T, `low` in the low half (one conversion instruction).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 v = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Element i of `first` in the low half, element i of `second` in the high half (16-bit elements).
__device__ __forceinline__ uint32_t pair_elements(const uint4& first, const uint4& second, int i) {
  return __byte_perm(word(first, i / 2), word(second, i / 2), i % 2 == 0 ? 0x5410 : 0x7632);
}

template <typename T>
__device__ __forceinline__ uint4 load16(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// The loads of one warp step: kSubSteps x 16 keys from `base`. Filled slots' values are loaded
// whether visible or not, so no load waits on the mask; hidden ones are zeroed when folded in.
template <typename T, int D>
struct WarpStepLoads {
  static constexpr int kSlices32 = D / 32;          // q.k: 32-wide slices of d, two k-steps each
  static constexpr int kSlices64 = D / 64;          // p.v: 64-wide slices of d, eight mma each
  static constexpr int kSubSteps = D == 64 ? 2 : 1;  // 16-key steps a warp loads at once
  static constexpr int kKeys = 16 * kSubSteps;

  uint4 k[kSubSteps][2][kSlices32];     // key base + 16u + 8e + g, d at 32c + 8t
  uint4 v[kSubSteps][2][2][kSlices64];  // key base + 16u + 8e + 2t + j, d at 64h + 8g
  bool live[kSubSteps][2][2];           // the same keys: filled and visible

  __device__ __forceinline__ void load(const T* keys, const T* values, const bool* visible, int base, int end,
                                       int g, int t) {
#pragma unroll
    for (int u = 0; u < kSubSteps; ++u)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = base + 16 * u + 8 * e + g;
#pragma unroll
        for (int c = 0; c < kSlices32; ++c)
          k[u][e][c] = key < end ? load16(keys + static_cast<int64_t>(key) * D + 32 * c + 8 * t)
                                 : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int value_key = base + 16 * u + 8 * e + 2 * t + j;
          const bool filled = value_key < end;
          live[u][e][j] = filled && visible[value_key];
#pragma unroll
          for (int h = 0; h < kSlices64; ++h)
            v[u][e][j][h] = filled ? load16(values + static_cast<int64_t>(value_key) * D + 64 * h + 8 * g)
                                   : make_uint4(0u, 0u, 0u, 0u);
        }
      }
  }
};

// One warp's share of a chunk: q's fragments, the running max and sum of row g (the sum is this
// lane's part until reduced) and the unnormalised output fragments.
template <typename T, int D>
struct WarpAttention {
  using Loads = WarpStepLoads<T, D>;
  uint4 q[Loads::kSlices32];             // row g's d at 32c + 8t (zero for the empty rows)
  float acc[Loads::kSlices64][8][2];     // [h][i]: row g, columns 64h + 16t + i and + 8
  float running_max = -INFINITY, running_sum = 0.f;

  __device__ __forceinline__ void fold(Loads& step, float scale_log2) {
    float score[Loads::kSubSteps][2][2];
    float step_max = running_max;
#pragma unroll
    for (int u = 0; u < Loads::kSubSteps; ++u)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        score[u][e][0] = score[u][e][1] = 0.f;
#pragma unroll
        for (int c = 0; c < Loads::kSlices32; ++c)
#pragma unroll
          for (int s = 0; s < 2; ++s)
            mma_rows_0_7<T>(score[u][e], word(q[c], 2 * s), word(q[c], 2 * s + 1), word(step.k[u][e][c], 2 * s),
                      word(step.k[u][e][c], 2 * s + 1));
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          score[u][e][j] = step.live[u][e][j] ? score[u][e][j] * scale_log2 : -INFINITY;
          step_max = fmaxf(step_max, score[u][e][j]);
#pragma unroll
          for (int h = 0; h < Loads::kSlices64; ++h)  // a 0 weight must not meet a NaN
            if (!step.live[u][e][j]) step.v[u][e][j][h] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    // The row's four lanes (same g) share one max.
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 1));
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 2));
    // While everything seen is hidden the max stays -inf; subtracting 0 then keeps exp2f at 0.
    const float shift = step_max == -INFINITY ? 0.f : step_max;
    const float rescale = exp2f(running_max - shift);
    running_max = step_max;
    running_sum *= rescale;
#pragma unroll
    for (int h = 0; h < Loads::kSlices64; ++h)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc[h][i][0] *= rescale;
        acc[h][i][1] *= rescale;
      }
#pragma unroll
    for (int u = 0; u < Loads::kSubSteps; ++u) {
      uint32_t p[2];  // keys 2t, 2t+1 of the 8-key groups e = 0, 1: the A fragment's a0, a2
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p0 = exp2f(score[u][e][0] - shift), p1 = exp2f(score[u][e][1] - shift);
        running_sum += p0 + p1;
        p[e] = pack_pair<T>(p0, p1);
      }
#pragma unroll
      for (int h = 0; h < Loads::kSlices64; ++h)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          mma_rows_0_7<T>(acc[h][i], p[0], p[1], pair_elements(step.v[u][0][0][h], step.v[u][0][1][h], i),
                    pair_elements(step.v[u][1][0][h], step.v[u][1][1][h], i));
    }
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kGroupedWarps * 32)
    grouped_decode_chunk_kernel(DecodeArgs args, int group) {
  using Loads = WarpStepLoads<T, D>;
  const DecodeChunk chunk = decode_chunk(args);
  if (chunk.empty()) return;
  const int split = chunk.split, kv_head = chunk.head, row = chunk.row, start = chunk.start, end = chunk.end;
  const int kv_heads = gridDim.y, splits = gridDim.x;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;

  const auto [keys, values] = open_chunk<T, D>(args, chunk);

  WarpAttention<T, D> attention;
  const int heads = kv_heads * group;
  const int64_t head_row = static_cast<int64_t>(row) * heads + static_cast<int64_t>(kv_head) * group;
#pragma unroll
  for (int c = 0; c < Loads::kSlices32; ++c) {
    attention.q[c] = g < group ? load16(static_cast<const T*>(args.q) + row * args.q_stride_b +
                                        (static_cast<int64_t>(kv_head) * group + g) * args.q_stride_h + 32 * c + 8 * t)
                               : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int h = 0; h < Loads::kSlices64; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i) attention.acc[h][i][0] = attention.acc[h][i][1] = 0.f;
  const bool* visible = args.visible + row * args.visible_stride_b;

  // Warps take steps in turn. Two register buffers: the next step's loads are in flight while
  // this one is folded in, so a warp is not left waiting a whole memory latency a step.
  constexpr int kStride = kGroupedWarps * Loads::kKeys;
  Loads buffers[2];
  int base = start + warp * Loads::kKeys;
  if (base < end) buffers[0].load(keys, values, visible, base, end, g, t);
  for (; base < end; base += 2 * kStride) {
    if (base + kStride < end) buffers[1].load(keys, values, visible, base + kStride, end, g, t);
    attention.fold(buffers[0], args.scale_log2);
    if (base + kStride >= end) break;
    if (base + 2 * kStride < end) buffers[0].load(keys, values, visible, base + 2 * kStride, end, g, t);
    attention.fold(buffers[1], args.scale_log2);
  }
  float running_max = attention.running_max, running_sum = attention.running_sum;
  auto& acc = attention.acc;
  constexpr int kSlices64 = Loads::kSlices64;
  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 1);
  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 2);

  // Merge the warps: each leaves its rows' max, sum and output.
  __shared__ float2 warp_stats[kGroupedWarps][kMaxDecodeGroup];
  __shared__ float warp_acc[kGroupedWarps][kMaxDecodeGroup][D];
  if (t == 0) warp_stats[warp][g] = make_float2(running_max, running_sum);
#pragma unroll
  for (int h = 0; h < kSlices64; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      warp_acc[warp][g][64 * h + 16 * t + i] = acc[h][i][0];
      warp_acc[warp][g][64 * h + 16 * t + 8 + i] = acc[h][i][1];
    }
  __syncthreads();
  for (int index = threadIdx.x; index < group * D; index += kGroupedWarps * 32) {
    const int r = index / D, d = index % D;
    const SoftmaxMerge merged = merge_softmax_parts(
        kGroupedWarps, [&](int w) { return warp_stats[w][r]; }, [&](int w) { return warp_acc[w][r][d]; });
    write_chunk_result<T, D>(args, head_row + r, split, splits, d, merged);  // (row, head)
  }
}

// Blocks of an instance an SM holds at once (registers bound it: two for the double buffer).
template <typename T, int D>
int resident_blocks() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, grouped_decode_chunk_kernel<T, D>,
                                                                 kGroupedWarps * 32, 0));
    return std::max(n, 1);
  }();
  return blocks;
}

}  // namespace

template <typename T, int D>
int grouped_decode_splits(int64_t kv_rows, int64_t max_len, int device) {
  const int64_t blocks = 2LL * resident_blocks<T, D>() * device_props(device).multiProcessorCount;
  return clamp_decode_splits(blocks / kv_rows, max_len);
}

template <typename T, int D>
void launch_grouped_decode_chunks(const DecodeArgs& args, int group, int rows, int kv_heads, int splits,
                                  cudaStream_t stream) {
  grouped_decode_chunk_kernel<T, D><<<dim3(splits, kv_heads, rows), kGroupedWarps * 32, 0, stream>>>(args, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define TRELLIS_GROUPED_DECODE_INSTANCE(T, D)                                                           \
  template int grouped_decode_splits<T, D>(int64_t, int64_t, int);                                      \
  template void launch_grouped_decode_chunks<T, D>(const DecodeArgs&, int, int, int, int, cudaStream_t);
TRELLIS_GROUPED_DECODE_INSTANCE(__nv_bfloat16, 64)
TRELLIS_GROUPED_DECODE_INSTANCE(__nv_bfloat16, 128)
TRELLIS_GROUPED_DECODE_INSTANCE(__half, 64)
TRELLIS_GROUPED_DECODE_INSTANCE(__half, 128)
#undef TRELLIS_GROUPED_DECODE_INSTANCE

}  // namespace trellis

// What the two decode-attention kernels share: csrc/decode_attention.cu (one kv head a query
// head, CUDA cores; the host entry point and the split merge) and csrc/decode_attention_grouped.cu
// (several query heads a kv head, tensor cores).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>

#include "kernel_common.h"

namespace trellis {

struct DecodeArgs {
  const void* q;  // [b, n, D], D contiguous; b and n strided
  int64_t q_stride_b, q_stride_h;
  const void* k_new;  // [b, n_kv, D], strided like q
  const void* v_new;
  int64_t new_stride_b, new_stride_h;
  void* keys;  // [b, n_kv, max_len, D] contiguous
  void* values;
  const bool* visible;  // [b, max_len]: key slot j may be attended to (checked up to position)
  int64_t visible_stride_b;
  const int64_t* position;  // the new token's slot; keys 0..position are read
  void* out;                // [b, n, D] contiguous, in the input dtype
  float* partial_out;       // [b, n, splits, D] (splits > 1 only)
  float2* partial_stats;    // [b, n, splits]: (max, sum of exponentials) in the log2 domain
  int max_len, chunk;
  float scale_log2;
};

// Query heads a kv head the grouped kernel takes (the rows 0..7 of one m16 tensor-core tile),
// and whether it has an instance for head dim `dim`.
constexpr int kMaxDecodeGroup = 8;
constexpr bool grouped_decode_head_dim(int64_t dim) { return dim == 64 || dim == 128; }

// Chunks (splits) are at least this many keys long, so a block's fixed costs stay small.
constexpr int kMinDecodeChunk = 128;

// Splits per row and head: `wanted` clamped to 1.. the count that keeps every chunk at least
// kMinDecodeChunk keys long. Each kernel's wish differs (decode_splits, grouped_decode_splits).
inline int clamp_decode_splits(int64_t wanted, int64_t max_len) {
  const int64_t most = (max_len + kMinDecodeChunk - 1) / kMinDecodeChunk;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, most)));
}

// Splits per row and kv head for the grouped kernel: two waves of resident blocks when the cache
// is full (fewer, longer chunks are faster there on an H200; more help while it fills).
// Instantiated for bf16 and fp16 at the head dims grouped_decode_head_dim admits.
template <typename T, int D>
int grouped_decode_splits(int64_t kv_rows, int64_t max_len, int device);

// Launches the grouped kernel's chunk pass, grid (splits, kv heads, rows); with splits > 1 the
// caller then merges the partial results.
template <typename T, int D>
void launch_grouped_decode_chunks(const DecodeArgs& args, int group, int rows, int kv_heads, int splits,
                                  cudaStream_t stream);

// ---------------------------------------------------------------- device pieces of both kernels
// One block's chunk of the cache, from the grid (splits, heads whose cache is read, rows): keys
// start..end-1 of that head's cache, `position` the new token's slot. `empty()` chunks start past
// the fill mark; their blocks return at once.
struct DecodeChunk {
  int split, head, row, position, start, end;
  __device__ __forceinline__ bool empty() const { return start > position; }
};

__device__ __forceinline__ DecodeChunk decode_chunk(const DecodeArgs& args) {
  DecodeChunk c;
  c.split = blockIdx.x;
  c.head = blockIdx.y;
  c.row = blockIdx.z;
  c.position = static_cast<int>(*args.position);
  c.start = c.split * args.chunk;
  c.end = min(c.start + args.chunk, c.position + 1);
  return c;
}

// The chunk's head's keys and values: its [max_len, D] slices of the cache.
template <typename T>
struct HeadCache {
  T* keys;
  T* values;
};

// The block's slices of the cache. The block whose chunk holds the new slot first writes the
// new token's key and value there; the barrier makes the block's own global writes visible to it.
template <typename T, int D>
__device__ __forceinline__ HeadCache<T> open_chunk(const DecodeArgs& args, const DecodeChunk& c) {
  const int64_t cache_row = static_cast<int64_t>(c.row) * gridDim.y + c.head;  // (row, head)
  T* keys = static_cast<T*>(args.keys) + cache_row * args.max_len * D;
  T* values = static_cast<T*>(args.values) + cache_row * args.max_len * D;
  if (c.position >= c.start + args.chunk) return {keys, values};
  if (threadIdx.x < D / 8) {
    const int64_t from = c.row * args.new_stride_b + c.head * args.new_stride_h + threadIdx.x * 8;
    const int64_t to = static_cast<int64_t>(c.position) * D + threadIdx.x * 8;
    *reinterpret_cast<uint4*>(keys + to) = *reinterpret_cast<const uint4*>(static_cast<const T*>(args.k_new) + from);
    *reinterpret_cast<uint4*>(values + to) = *reinterpret_cast<const uint4*>(static_cast<const T*>(args.v_new) + from);
  }
  __syncthreads();
  return {keys, values};
}

// Softmax over keys split into parts, merged: the largest part max, the sum of exponentials and
// one unnormalised output element, both rescaled to that max (log2 domain).
struct SoftmaxMerge {
  float max, sum, value;
  __device__ __forceinline__ float normalised() const { return sum > 0.f ? value / sum : 0.f; }
};

// `stats(p)`: part p's (max, sum) as a float2; `value(p)`: its output element. Loops unroll where
// `parts` is a constant after inlining (the in-block merges), and stay loops where it is not.
template <typename Stats, typename Value>
__device__ __forceinline__ SoftmaxMerge merge_softmax_parts(int parts, Stats stats, Value value) {
  SoftmaxMerge merged{-INFINITY, 0.f, 0.f};
#pragma unroll
  for (int p = 0; p < parts; ++p) merged.max = fmaxf(merged.max, stats(p).x);
  // While every part is hidden the max stays -inf; subtracting 0 then keeps exp2f at 0.
  const float shift = merged.max == -INFINITY ? 0.f : merged.max;
#pragma unroll
  for (int p = 0; p < parts; ++p) {
    const float weight = exp2f(stats(p).x - shift);
    merged.sum += stats(p).y * weight;
    merged.value += value(p) * weight;
  }
  return merged;
}

// A block's merged chunk, element d of (row, head) `head_row`: the output itself when the chunk
// is the whole cache (one split), else the chunk's part for the merge kernel.
template <typename T, int D>
__device__ __forceinline__ void write_chunk_result(const DecodeArgs& args, int64_t head_row, int split, int splits,
                                                   int d, const SoftmaxMerge& merged) {
  if (splits == 1) {
    static_cast<T*>(args.out)[head_row * D + d] = from_float<T>(merged.normalised());
  } else {
    args.partial_out[(head_row * splits + split) * D + d] = merged.value;
    if (d == 0) args.partial_stats[head_row * splits + split] = make_float2(merged.max, merged.sum);
  }
}

}  // namespace trellis

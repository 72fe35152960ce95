// What the two decode-attention kernels share: csrc/decode_attention.cu (one kv head a query
// head, CUDA cores; the host entry point and the split merge) and csrc/decode_attention_grouped.cu
// (several query heads a kv head, tensor cores).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <ATen/ATen.h>

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
inline bool grouped_decode_head_dim(int64_t dim) { return dim == 64 || dim == 128; }

// Chunks (splits) are at least this many keys long, so a block's fixed costs stay small.
constexpr int kMinDecodeChunk = 128;

// Splits per row and kv head for the grouped kernel: two waves of resident blocks when the cache
// is full (fewer, longer chunks are faster there on an H200; more help while it fills).
int grouped_decode_splits(int64_t kv_rows, int64_t max_len, at::ScalarType dtype, int dim, int device);

// Launches the grouped kernel's chunk pass, grid (splits, kv heads, rows); with splits > 1 the
// caller then merges the partial results.
void launch_grouped_decode_chunks(const DecodeArgs& args, at::ScalarType dtype, int dim, int group, int rows,
                                  int kv_heads, int splits, cudaStream_t stream);

}  // namespace trellis

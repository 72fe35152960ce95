// Attention of one new token per row over a KV cache, for graphed decode steps.
//
// Why: a decode step replayed from a CUDA graph (engine/decode_graph.py) must keep every
// shape, so with SDPA it attended over the cache's whole max_length under a mask, reading
// every key and value slot, filled or not. Here the fill mark is read on the device
// (`position`, the new token's slot), so a step reads only the slots up to it; and the new
// token's key and value go into the cache in the same launch (they took two index_copy_).
//
// Split-KV ("flash-decoding"): block (split, head, row) attends one head over one chunk of the
// cache and keeps the chunk's running max, sum of exponentials and unnormalised output in
// fp32. One split per row and head writes the output directly; with more, a second kernel
// merges the chunks. Chunks wholly past the fill mark return at once, so the grid is fixed by
// max_length and the launch is capturable.
//
// Inside a block, kLanes = D / 8 threads own a key at a time (a 16-byte vector of it each), so
// a block of 128 threads reads 128 / kLanes keys at a time, kDecodeUnroll of them per thread
// before it folds them into its running softmax (one rescale per kDecodeUnroll keys). The key
// groups are merged through shared memory at the end. Scores are in the log2 domain (q
// pre-scaled by log2(e) / sqrt(D)), so each exponential is one exp2f.
//
// This kernel is for one kv head a query head. Grouped heads (2..8 query heads a kv head) go to
// csrc/decode_attention_grouped.cu, which does their G dot products a key on tensor cores; the
// merge kernel below serves both.
#include <algorithm>
#include <cmath>

#include "decode_attention.h"
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeUnroll = 2;

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_chunk_kernel(DecodeArgs args) {
  constexpr int kLanes = D / 8;
  constexpr int kGroups = kDecodeThreads / kLanes;  // keys a block reads at a time
  const DecodeChunk chunk = decode_chunk(args);
  if (chunk.empty()) return;
  const int split = chunk.split, head = chunk.head, row = chunk.row, start = chunk.start, end = chunk.end;
  const int heads = gridDim.y, splits = gridDim.x;
  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;

  const int64_t head_row = static_cast<int64_t>(row) * heads + head;  // (row, head)
  const auto [keys, values] = open_chunk<T, D>(args, chunk);

  float q[8];
  {
    Pack<T, 8> packed;
    packed.load(static_cast<const T*>(args.q) + row * args.q_stride_b + head * args.q_stride_h + lane * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = packed.get(i) * args.scale_log2;
  }
  float running_max = -INFINITY, running_sum = 0.f, acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  const bool* visible = args.visible + row * args.visible_stride_b;

  // Every thread runs the same number of iterations (keys past `end` count as hidden), so the
  // shuffles below always have their whole warp.
  for (int base = start; base < end; base += kGroups * kDecodeUnroll) {
    Pack<T, 8> k_vec[kDecodeUnroll], v_vec[kDecodeUnroll];
    bool live[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int key = base + u * kGroups + group;
      live[u] = key < end && visible[key];
      if (live[u]) {
        k_vec[u].load(keys + static_cast<int64_t>(key) * D + lane * 8);
        v_vec[u].load(values + static_cast<int64_t>(key) * D + lane * 8);
      } else {
        k_vec[u].zero();
        v_vec[u].zero();
      }
    }
    float score[kDecodeUnroll];
    float tile_max = running_max;
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot = fmaf(q[i], k_vec[u].get(i), dot);
#pragma unroll
      for (int offset = kLanes / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      score[u] = live[u] ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, score[u]);
    }
    // While everything seen is hidden the max stays -inf; subtracting 0 then keeps exp2f at 0.
    const float shift = tile_max == -INFINITY ? 0.f : tile_max;
    const float rescale = exp2f(running_max - shift);
    running_max = tile_max;
    running_sum *= rescale;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= rescale;
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const float p = exp2f(score[u] - shift);
      running_sum += p;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, v_vec[u].get(i), acc[i]);
    }
  }

  // Merge the key groups: each leaves its max and sum (lane 0) and its output slice.
  __shared__ float2 group_stats[kGroups];
  __shared__ float group_acc[kGroups][D];
  if (lane == 0) group_stats[group] = make_float2(running_max, running_sum);
#pragma unroll
  for (int i = 0; i < 8; ++i) group_acc[group][lane * 8 + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
    const SoftmaxMerge merged = merge_softmax_parts(
        kGroups, [&](int g) { return group_stats[g]; }, [&](int g) { return group_acc[g][d]; });
    write_chunk_result<T, D>(args, head_row, split, splits, d, merged);
  }
}

// Merges the splits that reached the fill mark: block (head, row), one thread per element.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_attention_merge_kernel(DecodeArgs args, int splits) {
  const int64_t head_row = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int used = static_cast<int>(*args.position) / args.chunk + 1;
  const float2* stats = args.partial_stats + head_row * splits;
  const float* partial = args.partial_out + head_row * splits * D + threadIdx.x;
  const SoftmaxMerge merged =
      merge_softmax_parts(used, [&](int s) { return stats[s]; }, [&](int s) { return partial[s * D]; });
  static_cast<T*>(args.out)[head_row * D + threadIdx.x] = from_float<T>(merged.normalised());
}

// Splits per row and head (one kv head a query head): enough blocks to fill the GPU several
// times over when the cache is full, in chunks of at least kMinDecodeChunk keys.
inline int decode_splits(int64_t rows_heads, int64_t max_len, int device) {
  const int64_t blocks = 8LL * device_props(device).multiProcessorCount;
  return clamp_decode_splits((blocks + rows_heads - 1) / rows_heads, max_len);
}

// Splits per row and head when the caller leaves the choice to the kernels.
template <typename T, int D>
int default_splits(int64_t rows, int64_t heads, int64_t kv_heads, int64_t max_len, int device) {
  if constexpr (grouped_decode_head_dim(D)) {
    if (heads != kv_heads) return grouped_decode_splits<T, D>(rows * kv_heads, max_len, device);
  }
  return decode_splits(rows * heads, max_len, device);
}

// One kv head a query head: the chunk pass here; grouped heads: decode_attention_grouped.cu's.
// Then, with splits > 1, the merge, one block per (query head, row).
template <typename T, int D>
void launch_decode(const DecodeArgs& args, int rows, int heads, int kv_heads, int splits, cudaStream_t stream) {
  if (heads == kv_heads) {
    decode_attention_chunk_kernel<T, D><<<dim3(splits, heads, rows), kDecodeThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    if constexpr (grouped_decode_head_dim(D)) {
      launch_grouped_decode_chunks<T, D>(args, heads / kv_heads, rows, kv_heads, splits, stream);
    } else {
      TORCH_CHECK(false, "grouped decode attention has no instance at head_dim ", text(D));
    }
  }
  if (splits > 1) {
    decode_attention_merge_kernel<T, D><<<dim3(heads, rows), D, 0, stream>>>(args, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Calls f(TypeTag<T>, std::integral_constant<int, D>) for the kernels' instance of dtype and dim.
template <typename F>
void with_decode_instance(at::ScalarType dtype, int64_t dim, F f) {
  auto with_type = [&](auto tag) {
    if (dim == 64) {
      f(tag, std::integral_constant<int, 64>{});
    } else if (dim == 128) {
      f(tag, std::integral_constant<int, 128>{});
    } else if (dim == 256) {
      f(tag, std::integral_constant<int, 256>{});
    } else {
      TORCH_CHECK(false, "decode attention takes head_dim 64, 128 or 256, got ", text(dim));
    }
  };
  if (dtype == at::kBFloat16) {
    with_type(TypeTag<__nv_bfloat16>{});
  } else {
    TORCH_CHECK(dtype == at::kHalf, "decode attention takes bfloat16 or float16, got ", dtype);
    with_type(TypeTag<__half>{});
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& keys, const at::Tensor& values, const at::Tensor& visible,
                            const at::Tensor& position, int64_t splits) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1, "q must be a CUDA [b, n, d] tensor with d contiguous");
  check_cuda_contiguous(keys, "keys");
  check_cuda_contiguous(values, "values");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(), "keys and values must be one [b, n_kv, max_len, d] shape");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), max_len = keys.size(2);
  TORCH_CHECK(keys.size(0) == rows && keys.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0, "keys [",
              text(rows), ", n_kv, max_len, ", text(dim), "] with n_kv dividing ", text(heads), " expected, got ",
              sizes_text(keys.sizes()));
  const int64_t group = heads / kv_heads;
  TORCH_CHECK(group == 1 || (group <= kMaxDecodeGroup && grouped_decode_head_dim(dim)),
              "decode attention takes one kv head a query head, or 2..", text(kMaxDecodeGroup),
              " query heads a kv head at head_dim 64 or 128; got ", text(group), " at ", text(dim));
  for (const at::Tensor* t : {&k_new, &v_new}) {
    TORCH_CHECK(t->is_cuda() && t->dim() == 3 && t->size(0) == rows && t->size(1) == kv_heads &&
                    t->size(2) == dim && t->stride(2) == 1 && t->strides() == k_new.strides(),
                "k_new and v_new must be [b, n_kv, d] with d contiguous and the same strides");
  }
  for (const at::Tensor* t : {&q, &k_new, &v_new, &values}) {
    TORCH_CHECK(t->scalar_type() == keys.scalar_type(), "q, k, v and the cache must share one dtype");
  }
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && k_new.stride(0) % 8 == 0 && k_new.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(k_new.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_new.data_ptr()) % 16 == 0,
              "q, k_new and v_new rows must be 16-byte aligned");
  TORCH_CHECK(visible.is_cuda() && visible.scalar_type() == at::kBool && visible.dim() == 2 &&
                  visible.size(0) == rows && visible.size(1) == max_len && visible.stride(1) == 1,
              "visible must be a CUDA bool [b, max_len] tensor with contiguous rows");
  TORCH_CHECK(position.is_cuda() && position.scalar_type() == at::kLong && position.numel() == 1,
              "position must be one int64 on the GPU");
  TORCH_CHECK(max_len <= INT32_MAX / 2, "the cache is too long for decode attention: ", text(max_len));
  TORCH_CHECK(rows <= 65535 && heads <= 65535, "decode attention takes at most 65535 rows and heads (grid limits)");
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({rows, heads, dim}, q.options());
  with_decode_instance(q.scalar_type(), dim, [&](auto tag, auto dim_tag) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim_tag)::value;
    if (splits <= 0) splits = default_splits<T, D>(rows, heads, kv_heads, max_len, q.get_device());
    const int chunk = static_cast<int>((max_len + splits - 1) / splits);
    splits = (max_len + chunk - 1) / chunk;  // no split may start past the cache
    at::Tensor partial_out, partial_stats;
    if (splits > 1) {
      partial_out = at::empty({rows, heads, splits, dim}, q.options().dtype(at::kFloat));
      partial_stats = at::empty({rows, heads, splits, 2}, q.options().dtype(at::kFloat));
    }
    DecodeArgs args{q.data_ptr(), q.stride(0), q.stride(1), k_new.data_ptr(), v_new.data_ptr(), k_new.stride(0),
                    k_new.stride(1), keys.data_ptr(), values.data_ptr(), visible.data_ptr<bool>(), visible.stride(0),
                    position.data_ptr<int64_t>(), out.data_ptr(),
                    splits > 1 ? partial_out.data_ptr<float>() : nullptr,
                    splits > 1 ? reinterpret_cast<float2*>(partial_stats.data_ptr<float>()) : nullptr,
                    static_cast<int>(max_len), chunk, static_cast<float>(1.4426950408889634 / std::sqrt(double(dim)))};
    launch_decode<T, D>(args, rows, heads, kv_heads, splits, stream);
  });
  return out;
}

}  // namespace trellis

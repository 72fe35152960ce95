// Embedding backward straight into the fp32 gradient buffer.
//
// table[ids[i]] += grad[i] for the rows of one micro-batch, where `table` is the weight's
// main_grad. torch's embedding backward writes a dense gradient of the whole table and the
// buffer then adds that table into main_grad: two passes over vocabulary x hidden elements
// for a few thousand touched rows. Here only the touched rows are read and written.
//
// The caller sorts the ids (stable). Block c takes kChunk consecutive sorted positions: it
// loads their rows together, sums each run of one id in sorted order in fp32, and adds a run
// that starts and ends inside the chunk into its table row (which no other block touches). A
// run that crosses the chunk's edge leaves its partial sum instead: the part at the chunk's
// start in `head[c]`, the part at its end in `tail[c]`. A second kernel adds, for each run that
// starts in chunk c and goes on, tail[c] and the heads of the chunks it covers, in order, into
// the table. No atomics and a fixed order: the same bits on every run, and a run of n rows
// waits on about n / (kChunk * kJoinLoads) rounds of loads, not n. Negative ids (tokens
// another tensor-parallel rank owns) are skipped.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kEmbeddingThreads = 128;
constexpr int kEmbeddingChunk = 8;

template <int kVec>
__device__ __forceinline__ void store_to(float* dst, const float (&sum)[kVec]) {
  float4* out = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int k = 0; k < kVec / 4; ++k) out[k] = make_float4(sum[4 * k], sum[4 * k + 1], sum[4 * k + 2], sum[4 * k + 3]);
}

// The id at sorted position p, or -2 (no token) outside [0, n): never equal to a real or skipped id.
__device__ __forceinline__ int64_t id_at(const int64_t* sorted_ids, int64_t p, int64_t n) {
  return p >= 0 && p < n ? sorted_ids[p] : -2;
}

template <typename T>
__global__ void __launch_bounds__(kEmbeddingThreads) embedding_grad_chunk_kernel(
    float* __restrict__ table, float* __restrict__ head, float* __restrict__ tail,
    const int64_t* __restrict__ sorted_ids, const int64_t* __restrict__ order, const T* __restrict__ grad, int64_t n,
    int64_t hidden) {
  constexpr int kVec = vec_elems<T>();
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (col >= hidden) return;
  const int64_t chunk = blockIdx.x, first = chunk * kEmbeddingChunk;
  const int count = static_cast<int>(n - first < kEmbeddingChunk ? n - first : kEmbeddingChunk);
  int64_t ids[kEmbeddingChunk];
  Pack<T, kVec> rows[kEmbeddingChunk];
#pragma unroll
  for (int i = 0; i < kEmbeddingChunk; ++i) ids[i] = i < count ? sorted_ids[first + i] : -2;
#pragma unroll
  for (int i = 0; i < kEmbeddingChunk; ++i) {
    if (i < count && ids[i] >= 0) rows[i].load(grad + order[first + i] * hidden + col);
  }
  const int64_t before = id_at(sorted_ids, first - 1, n), after = id_at(sorted_ids, first + count, n);
  float sum[kVec];
  int run_start = 0;
#pragma unroll
  for (int i = 0; i < kEmbeddingChunk; ++i) {
    if (i >= count || ids[i] < 0) continue;
    if (i == 0 || ids[i] != ids[i - 1]) {
      run_start = i;
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum[j] += rows[i].get(j);
    const bool run_ends = i + 1 == count || ids[i + 1 < kEmbeddingChunk ? i + 1 : i] != ids[i];
    if (!run_ends) continue;
    const bool from_before = run_start == 0 && before == ids[i];
    const bool goes_on = i + 1 == count && after == ids[i];
    if (from_before) {
      store_to(head + chunk * hidden + col, sum);  // the whole chunk too, if the run also goes on
    } else if (goes_on) {
      store_to(tail + chunk * hidden + col, sum);
    } else {
      add_float4s(table + ids[i] * hidden + col, sum);
    }
  }
}

// The first sorted position past the run of `id` that covers position p: ids are sorted, so a
// binary search (a few dozen loads) finds a run's end however long the run.
__device__ __forceinline__ int64_t run_end(const int64_t* sorted_ids, int64_t p, int64_t n, int64_t id) {
  int64_t low = p + 1, high = n;  // sorted_ids[p] == id; the answer lies in [p + 1, n]
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (sorted_ids[mid] == id) low = mid + 1; else high = mid;
  }
  return low;
}

__device__ __forceinline__ void add_float4(float (&sum)[4], const float* src) {
  const float4 v = *reinterpret_cast<const float4*>(src);
  sum[0] += v.x, sum[1] += v.y, sum[2] += v.z, sum[3] += v.w;
}

// For chunk c whose last run starts in it and goes on: tail[c] + head[c + 1] + ... + head[e]
// into the table, e the chunk where the run ends. The heads are added in chunk order, as one
// chain; their loads go out kJoinLoads at a time, so a run over the whole micro-batch (padding)
// waits on n / (kChunk * kJoinLoads) loads, not on n / kChunk.
constexpr int kJoinLoads = 8;

__global__ void __launch_bounds__(kEmbeddingThreads) embedding_grad_join_kernel(
    float* __restrict__ table, const float* __restrict__ head, const float* __restrict__ tail,
    const int64_t* __restrict__ sorted_ids, int64_t n, int64_t hidden) {
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * 4;
  if (col >= hidden) return;
  const int64_t chunk = blockIdx.x, first = chunk * kEmbeddingChunk;
  const int64_t last = (first + kEmbeddingChunk < n ? first + kEmbeddingChunk : n) - 1;
  const int64_t id = sorted_ids[last];
  if (id < 0 || id_at(sorted_ids, last + 1, n) != id) return;  // nothing goes on into the next chunk
  if (sorted_ids[first] == id && id_at(sorted_ids, first - 1, n) == id) return;  // started before c
  const int64_t end_chunk = (run_end(sorted_ids, last, n, id) - 1) / kEmbeddingChunk;
  float sum[4] = {0.f, 0.f, 0.f, 0.f};
  add_float4(sum, tail + chunk * hidden + col);
  int64_t k = chunk + 1;
  for (; k + kJoinLoads - 1 <= end_chunk; k += kJoinLoads) {
    float4 v[kJoinLoads];
#pragma unroll
    for (int u = 0; u < kJoinLoads; ++u) v[u] = *reinterpret_cast<const float4*>(head + (k + u) * hidden + col);
#pragma unroll
    for (int u = 0; u < kJoinLoads; ++u) sum[0] += v[u].x, sum[1] += v[u].y, sum[2] += v[u].z, sum[3] += v[u].w;
  }
  for (; k <= end_chunk; ++k) add_float4(sum, head + k * hidden + col);
  add_float4s(table + id * hidden + col, sum);
}

void embedding_grad_accumulate(const at::Tensor& table, const at::Tensor& sorted_ids, const at::Tensor& order,
                               const at::Tensor& grad) {
  check_cuda_contiguous(table, "table");
  check_cuda_contiguous(grad, "grad");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2, "table must be a 2-D float32 tensor");
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == table.size(1), "grad must be [n, hidden] with the table's hidden");
  const int64_t n = grad.size(0), hidden = grad.size(1);
  for (const at::Tensor* t : {&sorted_ids, &order}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == at::kLong && t->numel() == n,
                "sorted_ids and order must be contiguous int64 CUDA tensors of grad's ", text(n), " rows");
  }
  TORCH_CHECK(table.get_device() == grad.get_device() && sorted_ids.get_device() == grad.get_device() &&
                  order.get_device() == grad.get_device(), "all tensors must be on one device");
  if (n == 0 || hidden == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = (n + kEmbeddingChunk - 1) / kEmbeddingChunk;
  TORCH_CHECK(chunks <= INT32_MAX, "too many rows for the embedding-gradient grid: ", text(n));
  // Written only where a run crosses a chunk's edge, and read only there.
  const at::Tensor partials = at::empty({2, chunks, hidden}, table.options());
  float* head = ptr<float>(partials);
  float* tail = head + chunks * hidden;
  dispatch_float_type(grad.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = vec_elems<T>();
    TORCH_CHECK(hidden % kVec == 0, "hidden must be a multiple of ", text(kVec), ", got ", text(hidden));
    const int64_t column_blocks = (hidden / kVec + kEmbeddingThreads - 1) / kEmbeddingThreads;
    TORCH_CHECK(column_blocks <= 65535, "hidden too large for the embedding-gradient grid: ", text(hidden));
    embedding_grad_chunk_kernel<T><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(column_blocks)),
                                     kEmbeddingThreads, 0, stream>>>(
        ptr<float>(table), head, tail, ptr<int64_t>(sorted_ids), ptr<int64_t>(order), ptr<T>(grad), n, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t join_blocks = (hidden / 4 + kEmbeddingThreads - 1) / kEmbeddingThreads;
  embedding_grad_join_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(join_blocks)),
                               kEmbeddingThreads, 0, stream>>>(ptr<float>(table), head, tail,
                                                                ptr<int64_t>(sorted_ids), n, hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace trellis

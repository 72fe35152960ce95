// Fused QKV split + rotary embedding, forward and backward.
//
// The forward reads the fused projection qkv [s, b, (H + 2K) d] once and writes dense
// q [s, b, H, d], k and v [s, b, K, d], rotating q and k (Llama's rotate-half convention:
// y_lo = x_lo cos_lo - x_hi sin_lo, y_hi = x_hi cos_hi + x_lo sin_hi over the two halves of a
// head). The backward reads dq, dk, dv and writes d qkv with the transposed rotation. cos/sin
// are fp32 [s, d] tables, rounded to the activations' dtype first (as Hugging Face's Llama
// computes RoPE), then the math is fp32 with one rounding at the end.
//
// A thread owns one 16-byte vector of a head's lower half and the matching vector of its
// upper half (rotated heads: q heads, then k heads, which is also their order inside qkv), or
// one vector of v (copied). q and k columns of a qkv row are head * d in that order, so a
// rotated head's offset is the same formula for both.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kRopeThreads = 128;

struct RopeShape {
  int64_t rows = 0;    // s * b
  int batch = 1;       // b: row / batch is the position in cos/sin
  int heads = 0, kv_heads = 0, head_dim = 0;
  __host__ __device__ int qkv_width() const { return (heads + 2 * kv_heads) * head_dim; }
};

template <typename T>
struct RopeTables {
  const float* cos;
  const float* sin;
  // cos/sin of `count` columns from `col` of position `pos`, rounded to T.
  template <int kCount>
  __device__ __forceinline__ void load(int pos, int d, int col, float (&c)[kCount], float (&s)[kCount]) const {
    Pack<float, kCount> cv, sv;
    const int64_t offset = static_cast<int64_t>(pos) * d + col;
    cv.load(cos + offset);
    sv.load(sin + offset);
#pragma unroll
    for (int j = 0; j < kCount; ++j) {
      c[j] = to_float(from_float<T>(cv.get(j)));
      s[j] = to_float(from_float<T>(sv.get(j)));
    }
  }
};

// Work item -> (rotated head and half-column, or v vector). Returns false past the row's end.
struct RopeItem {
  bool rotated;
  int head, col;  // rotated: head in [0, H + K), lower-half column; v: column inside v's row
};

__device__ __forceinline__ bool rope_item(const RopeShape& shape, int vec, int item, RopeItem& out) {
  const int half_vectors = shape.head_dim / 2 / vec;
  const int rotated_items = (shape.heads + shape.kv_heads) * half_vectors;
  if (item < rotated_items) {
    out = {true, item / half_vectors, (item % half_vectors) * vec};
    return true;
  }
  const int v_item = item - rotated_items;
  if (v_item * vec >= shape.kv_heads * shape.head_dim) return false;
  out = {false, 0, v_item * vec};
  return true;
}

// Grid: x = row, y = block of work items within the row.
template <typename T>
__global__ void __launch_bounds__(kRopeThreads) qkv_rope_forward_kernel(
    const T* __restrict__ qkv, RopeTables<T> tables, T* __restrict__ q, T* __restrict__ k,
    T* __restrict__ v, RopeShape shape) {
  constexpr int kVec = vec_elems<T>();
  RopeItem item;
  if (!rope_item(shape, kVec, blockIdx.y * blockDim.x + threadIdx.x, item)) return;
  const int64_t row = blockIdx.x;
  const int d = shape.head_dim, kv_width = shape.kv_heads * d;
  const T* src = qkv + row * shape.qkv_width();
  if (!item.rotated) {
    Pack<T, kVec> x;
    x.load(src + (shape.heads + shape.kv_heads) * d + item.col);
    x.store(v + row * kv_width + item.col);
    return;
  }
  const int lo = item.head * d + item.col, half = d / 2;
  Pack<T, kVec> x_lo, x_hi, y_lo, y_hi;
  x_lo.load(src + lo);
  x_hi.load(src + lo + half);
  float c_lo[kVec], s_lo[kVec], c_hi[kVec], s_hi[kVec];
  const int pos = static_cast<int>(blockIdx.x) / shape.batch;
  tables.load(pos, d, item.col, c_lo, s_lo);
  tables.load(pos, d, item.col + half, c_hi, s_hi);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float a = x_lo.get(j), b = x_hi.get(j);
    y_lo.set(j, a * c_lo[j] - b * s_lo[j]);
    y_hi.set(j, b * c_hi[j] + a * s_hi[j]);
  }
  T* dst = item.head < shape.heads ? q + row * shape.heads * d + lo
                                   : k + row * kv_width + (lo - shape.heads * d);
  y_lo.store(dst);
  y_hi.store(dst + half);
}

// dx_lo = dy_lo cos_lo + dy_hi sin_hi, dx_hi = dy_hi cos_hi - dy_lo sin_lo.
template <typename T>
__global__ void __launch_bounds__(kRopeThreads) qkv_rope_backward_kernel(
    const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv, RopeTables<T> tables,
    T* __restrict__ dqkv, RopeShape shape) {
  constexpr int kVec = vec_elems<T>();
  RopeItem item;
  if (!rope_item(shape, kVec, blockIdx.y * blockDim.x + threadIdx.x, item)) return;
  const int64_t row = blockIdx.x;
  const int d = shape.head_dim, kv_width = shape.kv_heads * d;
  T* dst = dqkv + row * shape.qkv_width();
  if (!item.rotated) {
    Pack<T, kVec> g;
    g.load(dv + row * kv_width + item.col);
    g.store(dst + (shape.heads + shape.kv_heads) * d + item.col);
    return;
  }
  const int lo = item.head * d + item.col, half = d / 2;
  const T* src = item.head < shape.heads ? dq + row * shape.heads * d + lo
                                         : dk + row * kv_width + (lo - shape.heads * d);
  Pack<T, kVec> g_lo, g_hi, out_lo, out_hi;
  g_lo.load(src);
  g_hi.load(src + half);
  float c_lo[kVec], s_lo[kVec], c_hi[kVec], s_hi[kVec];
  const int pos = static_cast<int>(blockIdx.x) / shape.batch;
  tables.load(pos, d, item.col, c_lo, s_lo);
  tables.load(pos, d, item.col + half, c_hi, s_hi);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float a = g_lo.get(j), b = g_hi.get(j);
    out_lo.set(j, a * c_lo[j] + b * s_hi[j]);
    out_hi.set(j, b * c_hi[j] - a * s_lo[j]);
  }
  out_lo.store(dst + lo);
  out_hi.store(dst + lo + half);
}

namespace {

void check_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t seq, int64_t head_dim) {
  for (const at::Tensor* t : {&cos, &sin}) {
    check_cuda_contiguous(*t, "cos/sin");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "cos/sin must be float32");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == seq && t->size(1) == head_dim,
                "cos/sin must be [s, head_dim] = ", sizes_text({seq, head_dim}), ", got ",
                sizes_text({t->dim() > 0 ? t->size(0) : -1, t->dim() > 1 ? t->size(1) : -1}));
  }
}

RopeShape rope_shape(int64_t seq, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int vec) {
  TORCH_CHECK(heads > 0 && kv_heads > 0, "heads and kv_heads must be positive");
  TORCH_CHECK(head_dim > 0 && head_dim % (2 * vec) == 0, "head_dim must be a positive multiple of ",
              text(2 * vec), " for this dtype, got ", text(head_dim));
  TORCH_CHECK(seq * batch <= INT32_MAX && (heads + 2 * kv_heads) * head_dim <= INT32_MAX, "too many rows or heads");
  RopeShape shape;
  shape.rows = seq * batch;
  shape.batch = static_cast<int>(batch);
  shape.heads = static_cast<int>(heads);
  shape.kv_heads = static_cast<int>(kv_heads);
  shape.head_dim = static_cast<int>(head_dim);
  return shape;
}

dim3 rope_grid(const RopeShape& shape, int vec) {
  const int64_t items = (shape.heads + shape.kv_heads) * (shape.head_dim / 2 / vec) +
                        shape.kv_heads * (shape.head_dim / vec);
  return dim3(static_cast<unsigned>(shape.rows), static_cast<unsigned>((items + kRopeThreads - 1) / kRopeThreads));
}

template <typename T>
RopeTables<T> tables_of(const at::Tensor& cos, const at::Tensor& sin) {
  return {ptr<float>(cos), ptr<float>(sin)};
}

}  // namespace

std::vector<at::Tensor> qkv_rope_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                         int64_t heads, int64_t kv_heads) {
  check_cuda_contiguous(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3, "qkv must be [s, b, (heads + 2 kv_heads) head_dim]");
  const int64_t seq = qkv.size(0), batch = qkv.size(1), width = qkv.size(2);
  TORCH_CHECK(heads + 2 * kv_heads > 0 && width % (heads + 2 * kv_heads) == 0,
              "qkv width ", text(width), " is not (heads + 2 kv_heads) x head_dim");
  const int64_t head_dim = width / (heads + 2 * kv_heads);
  check_tables(cos, sin, seq, head_dim);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor q = at::empty({seq, batch, heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({seq, batch, kv_heads, head_dim}, qkv.options());
  at::Tensor v = at::empty({seq, batch, kv_heads, head_dim}, qkv.options());
  if (seq * batch == 0) return {q, k, v};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(qkv.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RopeShape shape = rope_shape(seq, batch, heads, kv_heads, head_dim, vec_elems<T>());
    qkv_rope_forward_kernel<T><<<rope_grid(shape, vec_elems<T>()), kRopeThreads, 0, stream>>>(
        ptr<T>(qkv), tables_of<T>(cos, sin), ptr<T>(q), ptr<T>(k), ptr<T>(v), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, k, v};
}

at::Tensor qkv_rope_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                             const at::Tensor& sin) {
  check_cuda_contiguous(dq, "dq");
  check_cuda_contiguous(dk, "dk");
  check_cuda_contiguous(dv, "dv");
  TORCH_CHECK(dq.dim() == 4 && dk.dim() == 4 && dv.dim() == 4, "dq, dk, dv must be [s, b, heads, head_dim]");
  TORCH_CHECK(dk.sizes() == dv.sizes(), "dk and dv must have the same shape");
  TORCH_CHECK(dq.size(0) == dk.size(0) && dq.size(1) == dk.size(1) && dq.size(3) == dk.size(3),
              "dq and dk must share s, b and head_dim");
  TORCH_CHECK(dk.scalar_type() == dq.scalar_type() && dv.scalar_type() == dq.scalar_type(),
              "dq, dk, dv must share a dtype");
  const int64_t seq = dq.size(0), batch = dq.size(1), heads = dq.size(2), kv_heads = dk.size(2);
  const int64_t head_dim = dq.size(3);
  check_tables(cos, sin, seq, head_dim);
  const c10::cuda::CUDAGuard guard(dq.device());
  at::Tensor dqkv = at::empty({seq, batch, (heads + 2 * kv_heads) * head_dim}, dq.options());
  if (seq * batch == 0) return dqkv;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_type(dq.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RopeShape shape = rope_shape(seq, batch, heads, kv_heads, head_dim, vec_elems<T>());
    qkv_rope_backward_kernel<T><<<rope_grid(shape, vec_elems<T>()), kRopeThreads, 0, stream>>>(
        ptr<T>(dq), ptr<T>(dk), ptr<T>(dv), tables_of<T>(cos, sin), ptr<T>(dqkv), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dqkv;
}

}  // namespace trellis

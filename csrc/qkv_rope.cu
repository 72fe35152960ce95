// Fused QKV split + rotary embedding, forward and backward.
//
// The forward reads the fused projection qkv [s, b, (H + 2K) d] once and writes dense
// q [s, b, H, d], k and v [s, b, K, d], rotating q and k (Llama's rotate-half convention:
// y_lo = x_lo cos_lo - x_hi sin_lo, y_hi = x_hi cos_hi + x_lo sin_hi over the two halves of a
// head). The backward reads dq, dk, dv and writes d qkv with the transposed rotation. cos/sin
// are fp32 [s, d] tables, or [b, s, d] per sample (explicit position ids: left-padded prompts,
// packed documents), rounded to the activations' dtype first (as Hugging Face's Llama computes
// RoPE), then the math is fp32 with one rounding at the end.
//
// One kernel serves both passes: "packed" is qkv (or d qkv), "split" is q, k, v (or their
// gradients); the forward reads packed and writes split, the backward the other way. A thread
// owns one 16-byte vector of a head's lower half and the matching vector of its upper half
// (rotated heads: q heads, then k heads, which is also their order inside qkv), or one vector
// of v (copied), in 4 "units" that share one position and so one read of the cos/sin tables:
// 4 adjacent rows of the position (the b rows of a position are adjacent in [s, b, ...]) when
// the batch is a multiple of 4, else 2 rows x 2 adjacent heads, else 4 adjacent heads of one
// row, whichever the batch and head counts divide; a thread issues all its units' loads before
// its first store. Shapes none of these divide take one unit. Per-sample tables differ between
// a position's rows, so there a thread's units are heads of one row. Measured on an H200 (forward,
// llama shapes, docs/benchmarks.md): 4 rows are 7-8% faster than one row per thread, and at
// batches 1-3 the row x head splits 7-18% faster; chunks that span positions, with a table
// read per row, were 20-35% slower than one row.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kRopeThreads = 128;
constexpr int kRopeUnits = 4;  // units (rows x heads of one position) per thread where the shape allows

struct RopeShape {
  int64_t rows = 0;  // s * b; row = position * b + batch index
  int64_t table_stride_b = 0;  // elements between samples' cos/sin tables; 0: one [s, d] table for all
  int batch = 1;
  int heads = 0, kv_heads = 0, head_dim = 0;
  __host__ __device__ int qkv_width() const { return (heads + 2 * kv_heads) * head_dim; }
};

// The rotation as both passes use it: lo' = a c_lo - b u, hi' = b c_hi + a w, with (u, w) =
// (sin_lo, sin_hi) forward and (-sin_hi, -sin_lo) backward (the transposed rotation). The
// tables are held as floats already rounded through T (held as T packs instead, the one-row
// instance ran 10% slower: a conversion per use).
template <typename T, int kVec>
struct Rotation {
  float c_lo[kVec], c_hi[kVec], u[kVec], w[kVec];

  template <bool kBackward>
  __device__ __forceinline__ void load(const float* cos, const float* sin, int64_t offset, int half) {
    round_into(cos + offset, c_lo, false);
    round_into(cos + offset + half, c_hi, false);
    round_into(sin + (kBackward ? offset + half : offset), u, kBackward);
    round_into(sin + (kBackward ? offset : offset + half), w, kBackward);
  }

  __device__ __forceinline__ void apply(const Pack<T, kVec>& x_lo, const Pack<T, kVec>& x_hi, Pack<T, kVec>& y_lo,
                                        Pack<T, kVec>& y_hi) const {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float a = x_lo.get(j), b = x_hi.get(j);
      y_lo.set(j, a * c_lo[j] - b * u[j]);
      y_hi.set(j, b * c_hi[j] + a * w[j]);
    }
  }

 private:
  // kVec fp32 table values rounded to T, negated if asked (exact after the rounding).
  __device__ __forceinline__ static void round_into(const float* src, float (&out)[kVec], bool negate) {
    Pack<float, kVec> table;
    table.load(src);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float rounded = to_float(from_float<T>(table.get(j)));
      out[j] = negate ? -rounded : rounded;
    }
  }
};

// Where a work item's vectors live in one row: `packed` and `split` are element offsets, the
// latter into q, k or v as `target` says (0, 1, 2).
struct RopeItem {
  bool rotated = false;
  int col = 0;  // rotated: lower-half column inside the head; v: column inside v's row
  int64_t packed = 0, split = 0;
  int target = 0;
};

// Work item -> its place in row 0 of the grid's position, for a thread that takes `group`
// adjacent heads; false past the row's end. Items are the rotated (head group, half-vector)
// pairs, then v's (head group, vector) pairs. Heads are `d` elements apart in every tensor.
__device__ __forceinline__ bool rope_item(const RopeShape& shape, int vec, int group, int index, RopeItem& out) {
  const int d = shape.head_dim, half_vectors = d / 2 / vec;
  const int rotated_items = (shape.heads + shape.kv_heads) / group * half_vectors;
  if (index < rotated_items) {
    const int head = index / half_vectors * group;
    out.rotated = true;
    out.col = (index % half_vectors) * vec;
    out.packed = head * d + out.col;
    out.target = head < shape.heads ? 0 : 1;
    out.split = (head < shape.heads ? head : head - shape.heads) * d + out.col;
    return true;
  }
  const int v_index = index - rotated_items, head_vectors = d / vec;
  const int v_head = v_index / head_vectors * group;
  if (v_head >= shape.kv_heads) return false;
  out.col = v_head * d + (v_index % head_vectors) * vec;
  out.packed = (shape.heads + shape.kv_heads) * d + out.col;
  out.target = 2;
  out.split = out.col;
  return true;
}

template <typename T>
struct SplitTensors {
  T* q;
  T* k;
  T* v;
};

// Grid: x = chunk of kRows rows (one position), y = block of work items within a row; a thread
// takes kHeads adjacent heads in each of its rows. The input side is only read (the pointers
// are non-const so one kernel serves both directions).
template <typename T, bool kBackward, int kRows, int kHeads>
__global__ void __launch_bounds__(kRopeThreads) qkv_rope_kernel(
    T* __restrict__ packed, SplitTensors<T> split, const float* __restrict__ cos, const float* __restrict__ sin,
    RopeShape shape) {
  constexpr int kVec = vec_elems<T>();
  constexpr int kUnits = kRows * kHeads;
  RopeItem item;
  if (!rope_item(shape, kVec, kHeads, blockIdx.y * blockDim.x + threadIdx.x, item)) return;
  const int d = shape.head_dim, half = item.rotated ? d / 2 : 0;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  // Always kUnits (the grid is exact), but bounding the loops by it at run time changes how the
  // compiler schedules them: 83 registers instead of 102 in the four-row instance, 5 resident
  // blocks per SM instead of 4, and 11% faster.
  const int units = static_cast<int>(min(static_cast<int64_t>(kRows), shape.rows - first_row)) * kHeads;
  const int64_t split_width = static_cast<int64_t>(item.target == 0 ? shape.heads : shape.kv_heads) * d;
  T* split_base = item.target == 0 ? split.q : item.target == 1 ? split.k : split.v;
  T* packed_at = packed + first_row * shape.qkv_width() + item.packed;
  T* split_at = split_base + first_row * split_width + item.split;
  const T* src = kBackward ? split_at : packed_at;
  T* dst = kBackward ? packed_at : split_at;
  const int64_t src_stride = kBackward ? split_width : shape.qkv_width();
  const int64_t dst_stride = kBackward ? shape.qkv_width() : split_width;
  // Unit u: row u / kHeads of the chunk, head u % kHeads of the thread's group.
  auto src_at = [&](int u) { return src + u / kHeads * src_stride + u % kHeads * d; };
  auto dst_at = [&](int u) { return dst + u / kHeads * dst_stride + u % kHeads * d; };

  Pack<T, kVec> lo[kUnits], hi[kUnits];
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    if (u >= units) break;
    lo[u].load(src_at(u));
    if (item.rotated) hi[u].load(src_at(u) + half);
  }
  if (!item.rotated) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      if (u < units) lo[u].store(dst_at(u));
    }
    return;
  }
  Rotation<T, kVec> rotation;
  // kRows > 1 only with one table for all rows (rope_units), so the first row's table serves all.
  const int64_t table = first_row / shape.batch * d + first_row % shape.batch * shape.table_stride_b;
  rotation.template load<kBackward>(cos, sin, table + item.col, half);
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    if (u >= units) break;
    Pack<T, kVec> y_lo, y_hi;
    rotation.apply(lo[u], hi[u], y_lo, y_hi);
    y_lo.store(dst_at(u));
    y_hi.store(dst_at(u) + half);
  }
}

namespace {

// The tables' stride between samples: 0 for one [s, d] table, s * d for [b, s, d] ones.
int64_t check_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t seq, int64_t batch, int64_t head_dim) {
  TORCH_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have one shape, got ", sizes_text(cos.sizes()), " and ",
              sizes_text(sin.sizes()));
  for (const at::Tensor* t : {&cos, &sin}) {
    check_cuda_contiguous(*t, "cos/sin");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "cos/sin must be float32");
  }
  const bool shared = cos.dim() == 2 && cos.size(0) == seq && cos.size(1) == head_dim;
  const bool per_sample = cos.dim() == 3 && cos.size(0) == batch && cos.size(1) == seq && cos.size(2) == head_dim;
  TORCH_CHECK(shared || per_sample, "cos/sin must be [s, head_dim] = ", sizes_text({seq, head_dim}),
              " or [b, s, head_dim] = ", sizes_text({batch, seq, head_dim}), ", got ",
              sizes_text(cos.sizes()));
  return per_sample ? seq * head_dim : 0;
}

RopeShape rope_shape(int64_t seq, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int vec,
                     int64_t table_stride_b) {
  TORCH_CHECK(heads > 0 && kv_heads > 0, "heads and kv_heads must be positive");
  TORCH_CHECK(head_dim > 0 && head_dim % (2 * vec) == 0, "head_dim must be a positive multiple of ",
              text(2 * vec), " for this dtype, got ", text(head_dim));
  TORCH_CHECK(seq * batch <= INT32_MAX && (heads + 2 * kv_heads) * head_dim <= INT32_MAX, "too many rows or heads");
  RopeShape shape;
  shape.rows = seq * batch;
  shape.table_stride_b = table_stride_b;
  shape.batch = static_cast<int>(batch);
  shape.heads = static_cast<int>(heads);
  shape.kv_heads = static_cast<int>(kv_heads);
  shape.head_dim = static_cast<int>(head_dim);
  return shape;
}

// How a thread's units are split between rows and heads: rows of one position first (the
// measured 4-row case) where they share a table, then heads, so that both divide the shape.
struct RopeUnits {
  int rows = 1, heads = 1;
};

RopeUnits rope_units(const RopeShape& shape) {
  for (const RopeUnits units : {RopeUnits{kRopeUnits, 1}, RopeUnits{2, 2}, RopeUnits{1, kRopeUnits}})
    if ((units.rows == 1 || shape.table_stride_b == 0) && shape.batch % units.rows == 0 &&
        shape.heads % units.heads == 0 && shape.kv_heads % units.heads == 0)
      return units;
  return {};
}

// Launch shape: x = chunk of rows, y = block of a chunk's work items (the rotated (head group,
// half-vector) pairs, then v's (head group, vector) pairs, as rope_item numbers them). A chunk
// with fewer items than kRopeThreads takes a block of its items rounded up to a warp, so few
// threads idle: 56 items (head dim 64, 32/8 heads) had 72 of 128 idle. A grid over flat
// (chunk, item) pairs, which idles none, was 2-5% slower at head dim 128 (docs/benchmarks.md).
struct RopeLaunch {
  dim3 grid;
  int threads;
};

RopeLaunch rope_launch(const RopeShape& shape, int vec, const RopeUnits& units) {
  const int64_t items = (shape.heads + shape.kv_heads) / units.heads * (shape.head_dim / 2 / vec) +
                        shape.kv_heads / units.heads * (shape.head_dim / vec);
  const int64_t chunks = shape.rows / units.rows;  // exact: the batch is a multiple of units.rows
  const int threads = static_cast<int>(std::min<int64_t>(kRopeThreads, (items + kWarpSize - 1) / kWarpSize * kWarpSize));
  return {dim3(static_cast<unsigned>(chunks), static_cast<unsigned>((items + threads - 1) / threads)), threads};
}

template <typename T, bool kBackward>
void launch_qkv_rope(const at::Tensor& packed, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cos, const at::Tensor& sin, const RopeShape& shape) {
  // The kernel only reads the side its direction takes as input.
  const SplitTensors<T> split{ptr<T>(q), ptr<T>(k), ptr<T>(v)};
  const RopeUnits units = rope_units(shape);
  auto kernel = units.rows == kRopeUnits ? qkv_rope_kernel<T, kBackward, kRopeUnits, 1>
                : units.rows == 2        ? qkv_rope_kernel<T, kBackward, 2, 2>
                : units.heads == kRopeUnits ? qkv_rope_kernel<T, kBackward, 1, kRopeUnits>
                                            : qkv_rope_kernel<T, kBackward, 1, 1>;
  const RopeLaunch launch = rope_launch(shape, vec_elems<T>(), units);
  kernel<<<launch.grid, launch.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ptr<T>(packed), split, ptr<float>(cos), ptr<float>(sin), shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t table_stride_b = check_tables(cos, sin, seq, batch, head_dim);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor q = at::empty({seq, batch, heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({seq, batch, kv_heads, head_dim}, qkv.options());
  at::Tensor v = at::empty({seq, batch, kv_heads, head_dim}, qkv.options());
  if (seq * batch == 0) return {q, k, v};
  dispatch_float_type(qkv.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_qkv_rope<T, false>(qkv, q, k, v, cos, sin,
                              rope_shape(seq, batch, heads, kv_heads, head_dim, vec_elems<T>(), table_stride_b));
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
  const int64_t table_stride_b = check_tables(cos, sin, seq, batch, head_dim);
  const c10::cuda::CUDAGuard guard(dq.device());
  at::Tensor dqkv = at::empty({seq, batch, (heads + 2 * kv_heads) * head_dim}, dq.options());
  if (seq * batch == 0) return dqkv;
  dispatch_float_type(dq.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_qkv_rope<T, true>(dqkv, dq, dk, dv, cos, sin,
                             rope_shape(seq, batch, heads, kv_heads, head_dim, vec_elems<T>(), table_stride_b));
  });
  return dqkv;
}

}  // namespace trellis

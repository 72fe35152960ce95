// Host entry points of the trellis_kernels extension (bound to Python in bindings.cu).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace trellis {

// Longest hidden size the fused norms take (any multiple of 8 up to it). For long fp32 rows
// the backward keeps fp32 weight/bias-gradient sums for a whole row in shared memory: 16384
// columns x 4 bytes x 2 (weight and bias) = 128 KiB, inside Hopper's 227 KiB per block.
constexpr int64_t max_norm_hidden() { return 16384; }
// Longest softmax row (keys); rows stay in registers, up to 8 vectors x 512 threads of fp32.
constexpr int64_t max_softmax_keys() { return 16384; }

// Returns {y, mean, rstd}; mean is empty for RMSNorm. Statistics are fp32, one per row.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, double eps, bool rms);

// Returns {dx, dweight, dbias}: dweight/dbias are empty when not asked for (need_weight_grad
// false, or no bias). dresidual (optional, x's shape and dtype) is added into dx. `blocks` > 0
// overrides the number of partial-sum blocks (tuning only).
std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias,
                                      bool rms, bool need_weight_grad, const c10::optional<at::Tensor>& dresidual,
                                      int64_t blocks);

// y = softmax(scale * scores with masked entries removed) over the last dim of [b, h, sq, sk].
// mask (optional): bool, True = masked out, a [b, h, sq, sk] view whose strides may be 0.
// causal: key j is visible to query i iff j <= i + (sk - sq). Fully masked rows give zeros.
at::Tensor softmax_forward(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale,
                           bool causal);

// d scores from the saved softmax output: scale * y * (dy - sum(dy * y)).
at::Tensor softmax_backward(const at::Tensor& dy, const at::Tensor& y, double scale, bool causal);

// The largest |x| of a tensor as one float32 on its device (NaN if x holds one).
at::Tensor fp8_amax(const at::Tensor& x);

// x (2-D, both sizes multiples of 16) scaled by max / max(amax, 1e-12) and cast to e4m3 (or
// e5m2) in both layouts. Returns {x8 [rows, cols], x8 transposed and dense [cols, rows],
// inverse scale (0-dim float32)}; amax is one float32 on x's device.
std::vector<at::Tensor> fp8_cast_transpose(const at::Tensor& x, const at::Tensor& amax, bool e5m2);

// SwiGLU over h = [gate | up] (last dim 2 f, f a multiple of 8): y = silu(gate) * up, and the
// gradient of h from dy.
at::Tensor swiglu_forward(const at::Tensor& h);
at::Tensor swiglu_backward(const at::Tensor& h, const at::Tensor& dy);

// qkv [s, b, (heads + 2 kv_heads) d] -> {q [s, b, heads, d], k, v [s, b, kv_heads, d]}, dense, with
// rotate-half RoPE on q and k from fp32 cos/sin [s, d]; the backward returns d qkv.
std::vector<at::Tensor> qkv_rope_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                         int64_t heads, int64_t kv_heads);
at::Tensor qkv_rope_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                             const at::Tensor& sin);

// out (a weight's shape; bf16, fp16 or fp32) = NF4 codes in `packed` (two a byte, low nibble
// first, whole 64-blocks) times their block's scale: `absmax` (fp32, one per 64 weights), or
// under double quantisation absmax_codes (int8) * absmax_step (fp32, one per 256 codes) +
// absmax_mean. Bit-identical to parallel/nf4.py's torch reference.
void nf4_dequantize(at::Tensor& out, const at::Tensor& packed, const at::Tensor& code_values,
                    const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& absmax_codes,
                    const c10::optional<at::Tensor>& absmax_step, const c10::optional<at::Tensor>& absmax_mean);

// table [v, hidden] (float32, a weight's gradient buffer) += grad [n, hidden] rows at their
// ids, given sorted (stable) int64 ids and the sort's order; ids < 0 are skipped. Each id's rows
// are summed in sorted order in fp32 and added once, so the result is the same on every run.
void embedding_grad_accumulate(const at::Tensor& table, const at::Tensor& sorted_ids, const at::Tensor& order,
                               const at::Tensor& grad);

// Attention of one new token per row over a KV cache (a graphed decode step): writes k_new and
// v_new ([b, n_kv, d]) into keys/values ([b, n_kv, max_len, d], contiguous) at slot `position`
// (one int64 on the device) and returns softmax(q k^T / sqrt(d)) v for q [b, n, d] over the slots
// 0..position where `visible` [b, max_len] is true; the slots past position are never read.
// bf16 or fp16; one kv head a query head at d 64, 128 or 256, or 2..8 query heads a kv head at
// d 64 or 128 (tensor cores). `splits` > 0 sets the chunks per row and kv head (tests and
// tuning); 0 picks them from the GPU's size.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const at::Tensor& keys, const at::Tensor& values, const at::Tensor& visible,
                            const at::Tensor& position, int64_t splits);

// One AdamW step (torch.optim.AdamW's math, decoupled weight decay) over flat float32 tensors
// of one length, in place: master, exp_avg and exp_avg_sq are updated from grad x grad_scale
// (grad_scale: optional one-element float32 on the device, read there, so no host sync), and
// model_out (optional, bfloat16 or float16) receives the new master rounded to its dtype.
// `step` counts this update (1 for the first). All tensors contiguous and 16-byte aligned.
void adamw_step(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& model_out, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step,
                const c10::optional<at::Tensor>& grad_scale);

}  // namespace trellis

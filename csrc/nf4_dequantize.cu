// NF4 (QLoRA) dequantisation: packed 4-bit codes and per-64-block scales -> a dense weight.
//
// Format (parallel/nf4.py): element i's code index sits in byte i / 2 of `packed` (low nibble
// for even i); its value is code_values[index] * scale[i / 64]. Under double quantisation the
// scale itself is stored as an int8 code c with one fp32 step per 256 scales and one fp32
// mean: scale = c * step + mean.
//
// One launch does the whole dequantisation, scales included. The torch path (and an earlier
// Triton kernel) dequantised the scales first with four more launches a call, and at
// QLoRA's micro-batch 1 the host time of those launches set the step's pace. Each thread
// reads 8 packed bytes and writes 16 outputs as 16-byte vectors.
//
// The math is the torch reference's, operation for operation, with explicit round-to-nearest
// multiplies and adds (never contracted into an FMA), so the output is bit-identical to
// `nf4.dequantize_torch`.
#include "kernel_host.h"
#include "trellis_kernels.h"

namespace trellis {

constexpr int kNf4Threads = 256;
constexpr int kNf4ElemsPerThread = 16;  // 8 packed bytes in, one or more 16-byte vectors out
constexpr int64_t kNf4BlockSize = 64;        // weights per scale
constexpr int64_t kNf4ScaleBlockSize = 256;  // scales per second-level step (double quantisation)

template <typename T, bool kDoubleQuant>
__global__ void __launch_bounds__(kNf4Threads) nf4_dequantize_kernel(
    const uint8_t* __restrict__ packed, const float* __restrict__ code_values, const float* __restrict__ absmax,
    const int8_t* __restrict__ absmax_codes, const float* __restrict__ absmax_step,
    const float* __restrict__ absmax_mean, T* __restrict__ out, int64_t numel) {
  // Lane l holds code value l % 16 and a lookup is a warp shuffle: no shared-memory table, so
  // no barrier at the start of every block. On an H200 this ran at 95% of the copy rate where
  // a shared-memory table ran at 65% (llama3-8b's projections, docs/benchmarks.md).
  const float code_of_lane = code_values[threadIdx.x % 16];
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kNf4ElemsPerThread;
  const bool live = first < numel;
  const int64_t at = live ? first : 0;  // lanes past the end still take part in the shuffles
  // A thread's 16 elements lie in one 64-element block, so they share one scale.
  const int64_t block = at / kNf4BlockSize;
  float scale;
  if constexpr (kDoubleQuant) {
    scale = __fadd_rn(__fmul_rn(static_cast<float>(absmax_codes[block]), absmax_step[block / kNf4ScaleBlockSize]),
                      *absmax_mean);
  } else {
    scale = absmax[block];
  }
  // `packed` covers numel rounded up to whole 64-blocks, so these 8 bytes are in bounds.
  const uint2 bytes = *reinterpret_cast<const uint2*>(packed + at / 2);
  Pack<T, kNf4ElemsPerThread> values;
#pragma unroll
  for (int j = 0; j < kNf4ElemsPerThread / 2; ++j) {
    const uint32_t byte = ((j < 4 ? bytes.x : bytes.y) >> (8 * (j % 4))) & 0xFFu;
    values.set(2 * j, __fmul_rn(__shfl_sync(0xFFFFFFFFu, code_of_lane, byte & 0x0Fu), scale));
    values.set(2 * j + 1, __fmul_rn(__shfl_sync(0xFFFFFFFFu, code_of_lane, byte >> 4), scale));
  }
  if (!live) return;
  if (first + kNf4ElemsPerThread <= numel) {
    values.store(out + first);
  } else {  // the ragged tail of a weight whose size is not a multiple of 16
    const T* elems = reinterpret_cast<const T*>(values.chunk);
#pragma unroll  // constant indices keep `values` in registers
    for (int j = 0; j < kNf4ElemsPerThread; ++j) {
      if (first + j < numel) out[first + j] = elems[j];
    }
  }
}

void nf4_dequantize(at::Tensor& out, const at::Tensor& packed, const at::Tensor& code_values,
                    const c10::optional<at::Tensor>& absmax, const c10::optional<at::Tensor>& absmax_codes,
                    const c10::optional<at::Tensor>& absmax_step, const c10::optional<at::Tensor>& absmax_mean) {
  check_cuda_contiguous(out, "out");
  check_cuda_contiguous(packed, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8");
  TORCH_CHECK(code_values.is_cuda() && code_values.scalar_type() == at::kFloat && code_values.numel() == 16 &&
                  code_values.is_contiguous(), "code_values must be 16 contiguous float32 values on the GPU");
  const int64_t numel = out.numel();
  const int64_t blocks = (numel + kNf4BlockSize - 1) / kNf4BlockSize;
  TORCH_CHECK(packed.numel() == blocks * kNf4BlockSize / 2, "packed holds ", text(packed.numel()),
              " bytes; ", text(numel), " elements need ", text(blocks * kNf4BlockSize / 2));
  const bool double_quant = absmax_codes.has_value() && absmax_codes->defined();
  if (double_quant) {
    TORCH_CHECK(absmax_step.has_value() && absmax_mean.has_value(), "double quantisation needs step and mean");
    TORCH_CHECK(absmax_codes->is_cuda() && absmax_codes->scalar_type() == at::kChar && absmax_codes->is_contiguous() &&
                    absmax_codes->numel() == blocks, "absmax_codes must be ", text(blocks), " contiguous int8 values");
    TORCH_CHECK(absmax_step->is_cuda() && absmax_step->scalar_type() == at::kFloat && absmax_step->is_contiguous() &&
                    absmax_step->numel() == (blocks + kNf4ScaleBlockSize - 1) / kNf4ScaleBlockSize,
                "absmax_step must hold one contiguous float32 per 256 scales");
    TORCH_CHECK(absmax_mean->is_cuda() && absmax_mean->scalar_type() == at::kFloat && absmax_mean->numel() == 1,
                "absmax_mean must be one float32");
  } else {
    TORCH_CHECK(absmax.has_value() && absmax->is_cuda() && absmax->scalar_type() == at::kFloat &&
                    absmax->is_contiguous() && absmax->numel() == blocks,
                "absmax must be ", text(blocks), " contiguous float32 values");
  }
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t threads_needed = (numel + kNf4ElemsPerThread - 1) / kNf4ElemsPerThread;
  const int64_t grid = (threads_needed + kNf4Threads - 1) / kNf4Threads;
  TORCH_CHECK(grid <= INT32_MAX, "weight too large for one NF4 dequantise launch: ", text(numel));
  dispatch_float_type(out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = double_quant ? nf4_dequantize_kernel<T, true> : nf4_dequantize_kernel<T, false>;
    kernel<<<static_cast<unsigned>(grid), kNf4Threads, 0, stream>>>(
        ptr<uint8_t>(packed), ptr<float>(code_values), optional_ptr<float>(absmax),
        optional_ptr<int8_t>(absmax_codes), optional_ptr<float>(absmax_step), optional_ptr<float>(absmax_mean),
        ptr<T>(out), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace trellis

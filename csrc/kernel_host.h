// Host-side glue shared by the .cu files: dtype dispatch, device properties, launch checks.
// Deliberately avoids ATen/cuda/CUDAContext.h (it drags in cuBLAS/cuSPARSE headers), so the
// kernels compile against nothing but the CUDA runtime and torch's c10/cuda headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernel_common.h"

namespace trellis {

// Integers in TORCH_CHECK messages go through these (std::to_string), never streamed: built
// with CUDA 13.0's nvcc against torch 2.11, a message that streamed an integer crashed the
// process instead of raising (seen on an H200; strings and dtypes stream fine).
inline std::string text(int64_t value) { return std::to_string(value); }

// "[a, b, ...]", of a tensor's sizes or of a braced list (sizes() streamed crashes as integers do).
inline std::string sizes_text(at::IntArrayRef sizes) {
  std::string joined = "[";
  for (const int64_t size : sizes) joined += (joined.size() > 1 ? ", " : "") + std::to_string(size);
  return joined + "]";
}

// Properties of a device, read once per device and process.
inline const cudaDeviceProp& device_props(int device) {
  static std::mutex mutex;
  static std::vector<cudaDeviceProp> props;
  static std::vector<bool> filled;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(props.size())) {
    props.resize(device + 1);
    filled.resize(device + 1, false);
  }
  if (!filled[device]) {
    C10_CUDA_CHECK(cudaGetDeviceProperties(&props[device], device));
    filled[device] = true;
  }
  return props[device];
}

// Calls f(TypeTag<T>) for the CUDA element type of a torch floating dtype.
template <typename F>
void dispatch_float_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(TypeTag<float>{}); return;
    case at::kHalf: f(TypeTag<__half>{}); return;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    default: TORCH_CHECK(false, "trellis kernels take float32, float16 or bfloat16, got ", type);
  }
}

// Calls f(TypeTag<T>, TypeTag<W>) where the weight type W is the input type T or float32.
template <typename F>
void dispatch_norm_types(at::ScalarType x_type, at::ScalarType w_type, F&& f) {
  dispatch_float_type(x_type, [&](auto x_tag) {
    if (w_type == x_type) {
      f(x_tag, x_tag);
    } else {
      TORCH_CHECK(w_type == at::kFloat, "norm weight must have the input's dtype or float32, got ", w_type);
      f(x_tag, TypeTag<float>{});
    }
  });
}

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
inline const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

inline void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

inline dim3 row_grid(const RowLayout& layout, int64_t rows) {
  return dim3(static_cast<unsigned>((rows + layout.rows_per_block - 1) / layout.rows_per_block));
}

inline dim3 row_block(const RowLayout& layout) { return dim3(layout.threads, layout.rows_per_block); }

// ---------------------------------------------------------------- programmatic dependent launch
// Whether `kernel` may be launched to overlap the end of the kernel before it in the stream
// (Hopper's programmatic dependent launch): the device is compute capability 9.0 or newer, and
// the kernel was compiled for 9.0 or newer (its ptxVersion, also where the driver JIT-compiles
// it), so its wait_for_previous_grid() is real. Read once per kernel and process.
template <typename Kernel>
bool can_overlap_previous(Kernel kernel, int device) {
  if (device_props(device).major < 9) return false;
  static std::mutex mutex;
  static std::map<const void*, bool> compiled_for_it;
  std::lock_guard<std::mutex> lock(mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  auto found = compiled_for_it.find(key);
  if (found == compiled_for_it.end()) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    found = compiled_for_it.emplace(key, attributes.ptxVersion >= 90).first;
  }
  return found->second;
}

// Launches `kernel`; with `overlap` it may start before the previous kernel in the stream has
// finished, so it must call wait_for_previous_grid() before it reads anything that kernel wrote.
// A stream being captured into a CUDA graph gets a plain launch: capturing such launches needs
// CUDA 12.3 or newer, and the overlapped launch has not been run inside our graphs.
template <typename... Params, typename... Args>
void launch_kernel(bool overlap, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*kernel)(Params...),
                   Args&&... args) {
  if (overlap) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    overlap = capture == cudaStreamCaptureStatusNone;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace trellis

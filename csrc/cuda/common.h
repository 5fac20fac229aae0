// Shared device helpers of the keystone CUDA kernels (plain CUDA, no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "keystone_cuda.h"

namespace keystone_cuda {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// fp32 -> T, round to nearest even (as torch's .to(dtype)).
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(scalar_t{}) with the CUDA element type of a KsDtype; returns false for an unknown code.
template <typename F>
inline bool dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case KS_FLOAT32: f(float{}); return true;
    case KS_BFLOAT16: f(__nv_bfloat16{}); return true;
    case KS_FLOAT16: f(__half{}); return true;
    default: return false;
  }
}

}  // namespace keystone_cuda

// keystone-kernels: plain-CUDA launchers (no torch headers), called by keystone_cuda.cpp.
//
// Every launcher takes raw device pointers, sizes, strides in elements and the stream to run on,
// launches asynchronously and returns cudaGetLastError(). Index arrays (rows / cols) are int64
// device arrays or nullptr for "all, in order"; the caller has checked their values.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// Element types of the frozen weight / activations.
enum KsDtype : int { KS_FLOAT32 = 0, KS_BFLOAT16 = 1, KS_FLOAT16 = 2 };

// Fused AdamW + scatter over flat arenas (keystone_kernels/ops/layout.py): plain data shared by
// host (binding) and device (kernel).
struct KsAdamwArenas {
  float* p;
  const float* g;
  float* m;
  float* v;
  float* vmax;  // nullptr without amsgrad
};

struct KsAdamwScalars {
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float gscale;     // grad_scale, negated for maximize
  float w1;         // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  const float* device_scalars;  // capturable: [decay, step_size, bc2_sqrt, gscale, skip] on the device, else nullptr
};

#define KS_ADAMW_CHUNK 2048  // elements per row of the block table: keystone_kernels.ops.layout.BLOCK
#define KS_SEG_WIDTH 10      // columns of the segments table: keystone::kSegWidth

extern "C" {

// Number of T slices gather_wgrad should split into so that n x m outputs fill the GPU.
int64_t ks_gather_wgrad_splits(int64_t T, int64_t n, int64_t m, int device);
// Tokens per slice for a given number of slices (a multiple of the kernel's T tile).
int64_t ks_gather_wgrad_tokens_per_split(int64_t T, int64_t splits);

// out[s, i, j] = sum over t in slice s of dy[t, r(i)] * x[t, c(j)] in fp32, out contiguous
// [splits, n, m]; slice s covers tokens [s * t_per_split, min(T, (s + 1) * t_per_split)).
cudaError_t ks_gather_wgrad_launch(const void* dy, const void* x, int dtype, const int64_t* rows,
                                   const int64_t* cols, float* out, int64_t T, int64_t n, int64_t m,
                                   int64_t stride_dy_t, int64_t stride_dy_c, int64_t stride_x_t,
                                   int64_t stride_x_c, int64_t splits, int64_t t_per_split,
                                   cudaStream_t stream);

// w[r(i) * ws0 + c(j) * ws1] = rne(src[i * m + j]) for i < n, j < m; src contiguous fp32.
cudaError_t ks_scatter_to_frozen_launch(void* w, int dtype, int64_t ws0, int64_t ws1, const float* src,
                                        const int64_t* rows, const int64_t* cols, int64_t n, int64_t m,
                                        cudaStream_t stream);

// One launch for every tensor: gridDim.x = num_blocks; segments, index and blocks are device tables.
cudaError_t ks_fused_adamw_scatter_launch(KsAdamwArenas arenas, const int64_t* segments, const int64_t* index,
                                          const int64_t* blocks, int64_t num_blocks, KsAdamwScalars scalars,
                                          cudaStream_t stream);

}  // extern "C"

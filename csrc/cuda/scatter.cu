// Scatter of fp32 keystone values into the frozen weight:
//
//   w[r(i), c(j)] = rne(src[i, j])      r(i) = rows[i] or i, c(j) = cols[j] or j
//
// with rne the round-to-nearest-even cast into w's dtype; no other element of w is touched.
// Memory-bound: one thread per element, grid-stride; src reads are coalesced, weight writes are
// coalesced along a row when cols is dense and w's column stride is 1.
#include "common.h"

namespace keystone_cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool HAS_ROWS, bool HAS_COLS>
__global__ void __launch_bounds__(kThreads)
scatter_to_frozen_kernel(scalar_t* __restrict__ w, int64_t ws0, int64_t ws1, const float* __restrict__ src,
                         const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, int64_t n,
                         int64_t m) {
  const int64_t total = n * m;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += step) {
    const int64_t i = e / m, j = e - i * m;
    const int64_t r = HAS_ROWS ? rows[i] : i;
    const int64_t c = HAS_COLS ? cols[j] : j;
    w[r * ws0 + c * ws1] = from_f32<scalar_t>(src[e]);
  }
}

template <typename scalar_t, bool HAS_ROWS, bool HAS_COLS>
void launch(void* w, int64_t ws0, int64_t ws1, const float* src, const int64_t* rows, const int64_t* cols,
            int64_t n, int64_t m, cudaStream_t stream) {
  int64_t blocks = ceil_div(n * m, kThreads);
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride beyond: enough blocks to fill any GPU
  scatter_to_frozen_kernel<scalar_t, HAS_ROWS, HAS_COLS><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<scalar_t*>(w), ws0, ws1, src, rows, cols, n, m);
}

}  // namespace
}  // namespace keystone_cuda

using namespace keystone_cuda;

extern "C" cudaError_t ks_scatter_to_frozen_launch(void* w, int dtype, int64_t ws0, int64_t ws1, const float* src,
                                                   const int64_t* rows, const int64_t* cols, int64_t n, int64_t m,
                                                   cudaStream_t stream) {
  if (n <= 0 || m <= 0) return cudaSuccess;
  const bool ok = dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (rows != nullptr && cols != nullptr)
      launch<scalar_t, true, true>(w, ws0, ws1, src, rows, cols, n, m, stream);
    else if (rows != nullptr)
      launch<scalar_t, true, false>(w, ws0, ws1, src, rows, cols, n, m, stream);
    else if (cols != nullptr)
      launch<scalar_t, false, true>(w, ws0, ws1, src, rows, cols, n, m, stream);
    else
      launch<scalar_t, false, false>(w, ws0, ws1, src, rows, cols, n, m, stream);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

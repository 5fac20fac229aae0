// Gather weight gradient: dW[rows][:, cols] = dY[:, rows]^T @ X[:, cols], fp32 accumulation.
//
//   out[s, i, j] = sum_{t in slice s} dy[t, r(i)] * x[t, c(j)]     r(i) = rows[i] or i, c(j) = cols[j] or j
//
// A classic shared-memory tiled GEMM whose operand loads are gathers: each block owns a 64 x 64
// output tile, walks its T slice 16 tokens at a time, stages dy[t, r(i)] and x[t, c(j)] upcast to
// fp32 in shared memory and accumulates a 4 x 4 register tile per thread. No tensor cores: the
// Triton backend is the fast GPU path; this kernel is the dependency-free one. Slices of T write
// separate partials (the caller sums them): deterministic, no atomics.
#include "common.h"

namespace keystone_cuda {
namespace {

constexpr int kTileN = 64;   // output rows per block
constexpr int kTileM = 64;   // output columns per block
constexpr int kTileT = 16;   // tokens per shared-memory stage
constexpr int kThreads = 256;
constexpr int kMicro = 4;    // each thread: kMicro x kMicro outputs, strided by 16
static_assert(kTileN == kTileM, "the load loop below maps one index to both tiles");
static_assert(kTileN * kTileT == 4 * kThreads, "each thread loads 4 elements of each operand");

template <typename scalar_t, bool HAS_ROWS, bool HAS_COLS>
__global__ void __launch_bounds__(kThreads)
gather_wgrad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                    const int64_t* __restrict__ rows, const int64_t* __restrict__ cols,
                    float* __restrict__ out, int64_t T, int64_t n, int64_t m, int64_t sdy_t,
                    int64_t sdy_c, int64_t sx_t, int64_t sx_c, int64_t t_per_split) {
  __shared__ float a_tile[kTileT][kTileN + 4];  // a_tile[k][i] = dy[t0 + k, r(i0 + i)]
  __shared__ float b_tile[kTileT][kTileM + 4];  // b_tile[k][j] = x[t0 + k, c(j0 + j)]
  __shared__ int64_t a_off[kTileN];              // column offset of r(i) in dy, -1 past n
  __shared__ int64_t b_off[kTileM];              // column offset of c(j) in x, -1 past m

  const int tid = threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t split = blockIdx.z;
  const int64_t t_begin = split * t_per_split;
  const int64_t t_end = t_begin + t_per_split < T ? t_begin + t_per_split : T;

  if (tid < kTileN) {
    const int64_t i = i0 + tid;
    a_off[tid] = i < n ? (HAS_ROWS ? rows[i] : i) * sdy_c : -1;
  } else if (tid < kTileN + kTileM) {
    const int64_t j = j0 + (tid - kTileN);
    b_off[tid - kTileN] = j < m ? (HAS_COLS ? cols[j] : j) * sx_c : -1;
  }
  __syncthreads();

  float acc[kMicro][kMicro] = {};
  const int tx = tid % 16, ty = tid / 16;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTileT) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      // Consecutive threads read consecutive output indices: coalesced when the index is dense.
      const int idx = tid + l * kThreads;
      const int k = idx / kTileN, i = idx % kTileN;
      const int64_t t = t0 + k;
      const bool in_t = t < t_end;
      const int64_t ao = a_off[i], bo = b_off[i];
      a_tile[k][i] = (in_t && ao >= 0) ? to_f32(dy[t * sdy_t + ao]) : 0.f;
      b_tile[k][i] = (in_t && bo >= 0) ? to_f32(x[t * sx_t + bo]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileT; ++k) {
      float a[kMicro], b[kMicro];
#pragma unroll
      for (int r = 0; r < kMicro; ++r) a[r] = a_tile[k][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kMicro; ++c) b[c] = b_tile[k][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    __syncthreads();
  }

  float* o = out + split * n * m;
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= n) continue;
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (j < m) o[i * m + j] = acc[r][c];
    }
  }
}

template <typename scalar_t, bool HAS_ROWS, bool HAS_COLS>
void launch(const void* dy, const void* x, const int64_t* rows, const int64_t* cols, float* out, int64_t T,
            int64_t n, int64_t m, int64_t sdy_t, int64_t sdy_c, int64_t sx_t, int64_t sx_c, int64_t splits,
            int64_t t_per_split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kTileN)), static_cast<unsigned>(ceil_div(m, kTileM)),
                  static_cast<unsigned>(splits));
  gather_wgrad_kernel<scalar_t, HAS_ROWS, HAS_COLS><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x), rows, cols, out, T, n, m, sdy_t, sdy_c,
      sx_t, sx_c, t_per_split);
}

}  // namespace
}  // namespace keystone_cuda

using namespace keystone_cuda;

extern "C" int64_t ks_gather_wgrad_tokens_per_split(int64_t T, int64_t splits) {
  if (splits < 1) splits = 1;
  return ceil_div(ceil_div(T, splits), kTileT) * kTileT;
}

extern "C" int64_t ks_gather_wgrad_splits(int64_t T, int64_t n, int64_t m, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // clear the (non-sticky) error: one slice is always correct
    return 1;
  }
  const int64_t tiles = ceil_div(n, kTileN) * ceil_div(m, kTileM);
  int64_t want = ceil_div(2 * static_cast<int64_t>(sms), tiles > 0 ? tiles : 1);
  const int64_t most = ceil_div(T, 256);  // a slice under 256 tokens costs more than it saves
  if (want > most) want = most;
  if (want > 65535) want = 65535;  // gridDim.z limit
  return want < 1 ? 1 : want;
}

extern "C" cudaError_t ks_gather_wgrad_launch(const void* dy, const void* x, int dtype, const int64_t* rows,
                                              const int64_t* cols, float* out, int64_t T, int64_t n, int64_t m,
                                              int64_t stride_dy_t, int64_t stride_dy_c, int64_t stride_x_t,
                                              int64_t stride_x_c, int64_t splits, int64_t t_per_split,
                                              cudaStream_t stream) {
  if (n <= 0 || m <= 0 || splits <= 0) return cudaSuccess;
  if (ceil_div(m, kTileM) > 65535 || splits > 65535) return cudaErrorInvalidConfiguration;
  const bool ok = dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (rows != nullptr && cols != nullptr)
      launch<scalar_t, true, true>(dy, x, rows, cols, out, T, n, m, stride_dy_t, stride_dy_c, stride_x_t,
                                   stride_x_c, splits, t_per_split, stream);
    else if (rows != nullptr)
      launch<scalar_t, true, false>(dy, x, rows, cols, out, T, n, m, stride_dy_t, stride_dy_c, stride_x_t,
                                    stride_x_c, splits, t_per_split, stream);
    else if (cols != nullptr)
      launch<scalar_t, false, true>(dy, x, rows, cols, out, T, n, m, stride_dy_t, stride_dy_c, stride_x_t,
                                    stride_x_c, splits, t_per_split, stream);
    else
      launch<scalar_t, false, false>(dy, x, rows, cols, out, T, n, m, stride_dy_t, stride_dy_c, stride_x_t,
                                     stride_x_c, splits, t_per_split, stream);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

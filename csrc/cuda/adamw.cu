// Fused sparse AdamW + scatter over flat arenas, one launch for every keystone tensor of a group.
//
// Per element of the arenas (torch.optim.AdamW's math; fused multiply-adds exactly where torch's
// CPU kernels fuse, every other operation rounded on its own with _rn intrinsics, so the result
// does not depend on nvcc's --fmad):
//
//   g = grad * gscale;  p = p * decay;  m = fma(w1, g - m, m)            (lerp, |w1| < 0.5)
//   v = fma((1 - beta2) g, g, v beta2);   vmax = max(vmax, v)            (amsgrad: used below)
//   p = p + (-step_size m) / (sqrt(v) / bc2_sqrt + eps);  W_k[r(i), c(j)] = rne(p)
//
// The tables come from keystone_kernels/ops/layout.py, built once and resident on the device:
// segments [S, KS_SEG_WIDTH] (columns as keystone::SegColumn), index (row / column indices) and
// blocks [B, 2] (segment, first element). Each CUDA block takes KS_ADAMW_CHUNK elements of one
// tensor; tensors start 64-byte aligned in the arenas, so each thread moves 4 consecutive
// elements with 16-byte loads and stores. In capturable mode the step's scalars are read from a
// device array, and a set `skip` makes every block return before writing.
#include "common.h"

namespace keystone_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
static_assert(KS_ADAMW_CHUNK % (kThreads * kPerThread) == 0, "a chunk is a whole number of passes");

// Columns of a segment row (keystone::SegColumn in csrc/op_checks.h).
enum : int { kOffset = 0, kN, kM, kRowsAt, kColsAt, kWs0, kWs1, kWaddr, kWdtype, kWslot };

__device__ __forceinline__ void load4(const float* src, int64_t e, int cnt, float (&out)[4]) {
  if (cnt == 4) {
    const float4 q = *reinterpret_cast<const float4*>(src + e);
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = k < cnt ? src[e + k] : 0.f;
  }
}

__device__ __forceinline__ void store4(float* dst, int64_t e, int cnt, const float (&in)[4]) {
  if (cnt == 4) {
    *reinterpret_cast<float4*>(dst + e) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < cnt) dst[e + k] = in[k];
  }
}

__device__ __forceinline__ void store_weight(void* w, int64_t wdtype, int64_t off, float x) {
  switch (wdtype) {
    case KS_BFLOAT16: static_cast<__nv_bfloat16*>(w)[off] = from_f32<__nv_bfloat16>(x); break;
    case KS_FLOAT16: static_cast<__half*>(w)[off] = from_f32<__half>(x); break;
    default: static_cast<float*>(w)[off] = x; break;
  }
}

__global__ void __launch_bounds__(kThreads)
fused_adamw_scatter_kernel(KsAdamwArenas a, const int64_t* __restrict__ segments, const int64_t* __restrict__ index,
                           const int64_t* __restrict__ blocks, KsAdamwScalars s) {
  float decay = s.decay, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt, gscale = s.gscale;
  if (s.device_scalars != nullptr) {
    if (s.device_scalars[4] != 0.f) return;  // a skipped (non-finite) step changes nothing
    decay = s.device_scalars[0], step_size = s.device_scalars[1];
    bc2_sqrt = s.device_scalars[2], gscale = s.device_scalars[3];
  }
  const int64_t seg = blocks[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t start = blocks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t* row = segments + seg * KS_SEG_WIDTH;
  const int64_t mcols = row[kM], numel = row[kN] * mcols, base = row[kOffset];
  const int64_t end = start + KS_ADAMW_CHUNK < numel ? start + KS_ADAMW_CHUNK : numel;
  const bool small_w1 = fabsf(s.w1) < 0.5f;  // torch's lerp switches formula at weight 0.5
  const float one_minus_w1 = __fsub_rn(1.f, s.w1);
  const bool amsgrad = a.vmax != nullptr;

  for (int64_t e = start + static_cast<int64_t>(threadIdx.x) * kPerThread; e < end;
       e += static_cast<int64_t>(kThreads) * kPerThread) {
    const int cnt = end - e < kPerThread ? static_cast<int>(end - e) : kPerThread;
    const int64_t at = base + e;  // a multiple of 4 elements: 16-byte aligned
    float p[4], g[4], m[4], v[4], vmax[4];
    load4(a.p, at, cnt, p);
    load4(a.g, at, cnt, g);
    load4(a.m, at, cnt, m);
    load4(a.v, at, cnt, v);
    if (amsgrad) load4(a.vmax, at, cnt, vmax);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float gk = __fmul_rn(g[k], gscale);
      const float pk = __fmul_rn(p[k], decay);
      const float diff = __fsub_rn(gk, m[k]);
      m[k] = small_w1 ? fmaf(s.w1, diff, m[k]) : fmaf(-diff, one_minus_w1, gk);
      v[k] = fmaf(__fmul_rn(s.one_minus_beta2, gk), gk, __fmul_rn(v[k], s.beta2));
      float vv = v[k];
      if (amsgrad) {
        vv = (vmax[k] > vv || vmax[k] != vmax[k]) ? vmax[k] : vv;  // torch.maximum: NaN wins
        vmax[k] = vv;
      }
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), bc2_sqrt), s.eps);
      p[k] = __fadd_rn(pk, __fdiv_rn(__fmul_rn(-step_size, m[k]), denom));
    }
    store4(a.p, at, cnt, p);
    store4(a.m, at, cnt, m);
    store4(a.v, at, cnt, v);
    if (amsgrad) store4(a.vmax, at, cnt, vmax);

    const int64_t wdtype = row[kWdtype];
    if (wdtype < 0) continue;  // no frozen target (a norm weight, say): nothing to scatter
    void* w = reinterpret_cast<void*>(row[kWaddr]);
    const int64_t* rows = row[kRowsAt] >= 0 ? index + row[kRowsAt] : nullptr;
    const int64_t* cols = row[kColsAt] >= 0 ? index + row[kColsAt] : nullptr;
    int64_t i = e / mcols, j = e - i * mcols;
    for (int k = 0; k < cnt; ++k) {
      const int64_t r = rows != nullptr ? rows[i] : i;
      const int64_t c = cols != nullptr ? cols[j] : j;
      store_weight(w, wdtype, r * row[kWs0] + c * row[kWs1], p[k]);
      if (++j == mcols) j = 0, ++i;
    }
  }
}

}  // namespace
}  // namespace keystone_cuda

using namespace keystone_cuda;

extern "C" cudaError_t ks_fused_adamw_scatter_launch(KsAdamwArenas arenas, const int64_t* segments,
                                                     const int64_t* index, const int64_t* blocks, int64_t num_blocks,
                                                     KsAdamwScalars scalars, cudaStream_t stream) {
  if (num_blocks <= 0) return cudaSuccess;
  if (num_blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  fused_adamw_scatter_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(arenas, segments, index,
                                                                                      blocks, scalars);
  return cudaGetLastError();
}

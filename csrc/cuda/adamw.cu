// Fused sparse AdamW + scatter over many keystone tensors in one launch.
//
// Per element of keystone tensor k (torch.optim.AdamW's math; fused multiply-adds exactly where
// torch's CPU kernels fuse, every other operation rounded on its own with _rn intrinsics, so the
// result does not depend on nvcc's --fmad):
//
//   g = grad * gscale;  p = p * decay_k;  m = fma(w1, g - m, m)          (lerp, |w1| < 0.5)
//   v = fma((1 - beta2) g, g, v beta2);   vmax = max(vmax, v)            (amsgrad: used below)
//   p = p + (-step_size_k m) / (sqrt(v) / bc2_sqrt_k + eps);  W_k[r(i), c(j)] = rne(p)
//
// Each CUDA block takes KS_ADAMW_CHUNK elements of one tensor from the block table; each thread
// handles 4 consecutive elements per pass, with 16-byte loads and stores when the tensor's fp32
// arrays are 16-byte aligned (the chunk start is a multiple of 4 elements).
#include "common.h"

namespace keystone_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
static_assert(KS_ADAMW_CHUNK % (kThreads * kPerThread) == 0, "a chunk is a whole number of passes");

__device__ __forceinline__ void load4(const float* src, int64_t e, int cnt, bool vec, float (&out)[4]) {
  if (vec && cnt == 4) {
    const float4 q = *reinterpret_cast<const float4*>(src + e);
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = k < cnt ? src[e + k] : 0.f;
  }
}

__device__ __forceinline__ void store4(float* dst, int64_t e, int cnt, bool vec, const float (&in)[4]) {
  if (vec && cnt == 4) {
    *reinterpret_cast<float4*>(dst + e) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < cnt) dst[e + k] = in[k];
  }
}

__device__ __forceinline__ void store_weight(const KsAdamwTensor& t, int64_t off, float x) {
  switch (t.wdtype) {
    case KS_BFLOAT16: static_cast<__nv_bfloat16*>(t.w)[off] = from_f32<__nv_bfloat16>(x); break;
    case KS_FLOAT16: static_cast<__half*>(t.w)[off] = from_f32<__half>(x); break;
    default: static_cast<float*>(t.w)[off] = x; break;
  }
}

__global__ void __launch_bounds__(kThreads)
fused_adamw_scatter_kernel(const KsAdamwTensor* __restrict__ tensors, const KsAdamwBlock* __restrict__ blocks,
                           KsAdamwScalars s) {
  const KsAdamwBlock b = blocks[blockIdx.x];
  const KsAdamwTensor t = tensors[b.tensor];
  const int64_t numel = t.n * t.mcols;
  const int64_t end = b.start + KS_ADAMW_CHUNK < numel ? b.start + KS_ADAMW_CHUNK : numel;
  const uintptr_t addr_bits = reinterpret_cast<uintptr_t>(t.p) | reinterpret_cast<uintptr_t>(t.g) |
                              reinterpret_cast<uintptr_t>(t.m) | reinterpret_cast<uintptr_t>(t.v) |
                              reinterpret_cast<uintptr_t>(s.amsgrad ? t.vmax : t.p);
  const bool vec = (addr_bits & 15) == 0;
  const bool small_w1 = fabsf(s.w1) < 0.5f;  // torch's lerp switches formula at weight 0.5
  const float one_minus_w1 = __fsub_rn(1.f, s.w1);

  for (int64_t e = b.start + static_cast<int64_t>(threadIdx.x) * kPerThread; e < end;
       e += static_cast<int64_t>(kThreads) * kPerThread) {
    const int cnt = end - e < kPerThread ? static_cast<int>(end - e) : kPerThread;
    float p[4], g[4], m[4], v[4], vmax[4];
    load4(t.p, e, cnt, vec, p);
    load4(t.g, e, cnt, vec, g);
    load4(t.m, e, cnt, vec, m);
    load4(t.v, e, cnt, vec, v);
    if (s.amsgrad) load4(t.vmax, e, cnt, vec, vmax);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float gk = __fmul_rn(g[k], s.gscale);
      const float pk = __fmul_rn(p[k], t.decay);
      const float diff = __fsub_rn(gk, m[k]);
      m[k] = small_w1 ? fmaf(s.w1, diff, m[k]) : fmaf(-diff, one_minus_w1, gk);
      v[k] = fmaf(__fmul_rn(s.one_minus_beta2, gk), gk, __fmul_rn(v[k], s.beta2));
      float vv = v[k];
      if (s.amsgrad) {
        vv = (vmax[k] > vv || vmax[k] != vmax[k]) ? vmax[k] : vv;  // torch.maximum: NaN wins
        vmax[k] = vv;
      }
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vv), t.bc2_sqrt), s.eps);
      p[k] = __fadd_rn(pk, __fdiv_rn(__fmul_rn(-t.step_size, m[k]), denom));
    }
    store4(t.p, e, cnt, vec, p);
    store4(t.m, e, cnt, vec, m);
    store4(t.v, e, cnt, vec, v);
    if (s.amsgrad) store4(t.vmax, e, cnt, vec, vmax);

    int64_t i = e / t.mcols, j = e - i * t.mcols;
    for (int k = 0; k < cnt; ++k) {
      const int64_t r = t.rows != nullptr ? t.rows[i] : i;
      const int64_t c = t.cols != nullptr ? t.cols[j] : j;
      store_weight(t, r * t.ws0 + c * t.ws1, p[k]);
      if (++j == t.mcols) j = 0, ++i;
    }
  }
}

}  // namespace
}  // namespace keystone_cuda

using namespace keystone_cuda;

extern "C" cudaError_t ks_fused_adamw_scatter_launch(const KsAdamwTensor* tensors, const KsAdamwBlock* blocks,
                                                     int64_t num_blocks, KsAdamwScalars scalars,
                                                     cudaStream_t stream) {
  if (num_blocks <= 0) return cudaSuccess;
  if (num_blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  fused_adamw_scatter_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(tensors, blocks, scalars);
  return cudaGetLastError();
}

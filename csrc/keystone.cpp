// keystone-kernels: operator schemas and CPU kernels.
//
// A keystone tensor is the dense sub-matrix W[rows][:, cols] of a frozen weight W [out, in];
// an absent index (None) means "all, in order". Schemas live here, in TORCH_LIBRARY(keystone);
// CUDA kernels are registered separately by csrc/cuda/keystone_cuda.cpp when built with CUDA.
//
// Only light headers: <torch/extension.h> (pybind) costs about a minute of compile time here and
// nothing in this file needs Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace keystone {
namespace {

using at::Tensor;

// Checks shared by every CPU kernel. The Python layer (keystone_kernels/ops/dispatch.py) validates
// first with ValueErrors; these keep a direct torch.ops.keystone call from corrupting memory.
void check_index(const std::optional<Tensor>& idx, const char* op, const std::string& name, int64_t bound) {
  if (!idx.has_value()) return;
  const Tensor& t = *idx;
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU like the other arguments, got ",
              t.device());
  const Tensor c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, op, ": ", name, "[", i, "] = ", p[i], " is out of range [0, ", bound,
                ")");
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// out[t, j] = float(in[t, idx[j]]): one pass that gathers and upcasts into a contiguous fp32
// [T, n] buffer, the shape BLAS wants; without idx, in as fp32.
Tensor gather_cols_f32(const Tensor& in, const std::optional<Tensor>& idx) {
  const int64_t T = in.size(0);
  // Without an index ATen's vectorised cast is the fastest (a no-op for fp32: at::mm takes any strides).
  if (!idx.has_value()) return in.to(at::kFloat);
  const int64_t n = idx->numel();
  Tensor out = at::empty({T, n}, in.options().dtype(at::kFloat));
  if (T == 0 || n == 0) return out;
  const Tensor ci = idx->contiguous();
  const int64_t* ip = ci.data_ptr<int64_t>();
  const int64_t s0 = in.stride(0), s1 = in.stride(1);
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "keystone_gather_cols", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = src + t * s0;
        float* dst = op + t * n;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[ip[j] * s1]);
      }
    });
  });
  return out;
}

// dW[rows][:, cols] = grad_out[:, rows]^T @ x[:, cols] in fp32. On the CPU a BLAS GEMM beats any
// hand-written loop, so the kernel is: gather + upcast the needed columns, then one at::mm.
Tensor gather_wgrad_cpu(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& rows,
                        const std::optional<Tensor>& cols) {
  constexpr const char* op = kWgradOp;
  check_wgrad_shapes(grad_out, x);
  TORCH_CHECK(is_float_dtype(grad_out.scalar_type()), op, ": grad_out must be float32, bfloat16 or float16, got ",
              grad_out.scalar_type());
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), op, ": x must have grad_out's dtype ",
              grad_out.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(grad_out.device().is_cpu() && x.device().is_cpu(), op, ": grad_out and x must be CPU tensors");
  check_index(rows, op, "rows", grad_out.size(1));
  check_index(cols, op, "cols", x.size(1));
  const Tensor g = gather_cols_f32(grad_out, rows);
  const Tensor xs = gather_cols_f32(x, cols);
  return at::mm(g.t(), xs);  // [n, T] @ [T, m]; zeros when T == 0
}

template <typename scalar_t>
void scatter_rows(scalar_t* w, int64_t ws0, int64_t ws1, const float* src, int64_t n, int64_t m,
                  const int64_t* rows, const int64_t* cols) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* wrow = w + (rows != nullptr ? rows[i] : i) * ws0;
      const float* s = src + i * m;
      // c10::BFloat16 / c10::Half constructors from float round to nearest even.
      if (cols != nullptr) {
        for (int64_t j = 0; j < m; ++j) wrow[cols[j] * ws1] = static_cast<scalar_t>(s[j]);
      } else {
        for (int64_t j = 0; j < m; ++j) wrow[j * ws1] = static_cast<scalar_t>(s[j]);
      }
    }
  });
}

void check_weight(const Tensor& weight, const char* op, const std::string& name) {
  TORCH_CHECK(weight.dim() == 2, op, ": ", name, " must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", weight.scalar_type());
}

// weight[rows[i], cols[j]] = rne(src[i, j]); every other element of weight is left untouched.
void scatter_to_frozen_cpu(const Tensor& weight, const Tensor& src, const std::optional<Tensor>& rows,
                           const std::optional<Tensor>& cols) {
  constexpr const char* op = "keystone::scatter_to_frozen";
  check_weight(weight, op, "weight");
  TORCH_CHECK(src.scalar_type() == at::kFloat, op, ": src must be float32, got ", src.scalar_type());
  TORCH_CHECK(weight.device().is_cpu() && src.device().is_cpu(), op, ": weight and src must be CPU tensors");
  const int64_t n = rows.has_value() ? rows->numel() : weight.size(0);
  const int64_t m = cols.has_value() ? cols->numel() : weight.size(1);
  TORCH_CHECK(src.dim() == 2 && src.size(0) == n && src.size(1) == m, op, ": src must have shape [", n, ", ", m,
              "] (len(rows) or out, len(cols) or in), got ", src.sizes());
  check_index(rows, op, "rows", weight.size(0));
  check_index(cols, op, "cols", weight.size(1));
  if (n == 0 || m == 0) return;
  const Tensor s = src.contiguous();
  const Tensor r = rows.has_value() ? rows->contiguous() : Tensor();
  const Tensor c = cols.has_value() ? cols->contiguous() : Tensor();
  const int64_t* rp = rows.has_value() ? r.data_ptr<int64_t>() : nullptr;
  const int64_t* cp = cols.has_value() ? c.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "keystone_scatter", [&] {
    scatter_rows<scalar_t>(weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                           s.const_data_ptr<float>(), n, m, rp, cp);
  });
}

// ----------------------------------------------------------------------------- fused AdamW

// Per-tensor and shared scalars, in fp32 as torch's own CPU kernels use them.
struct AdamwScalars {
  float gscale;     // grad_scale, negated for maximize
  float decay;      // 1 - lr * weight_decay
  float w1;         // 1 - beta1, the lerp weight
  float b2;         // beta2
  float omb2;       // 1 - beta2
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
};

template <bool FUSED>
inline __attribute__((always_inline)) float madd(float a, float b, float c) {
  if constexpr (FUSED) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;  // stays unfused: the extension is compiled with -ffp-contract=off
  }
}

// The expressions of torch.optim.AdamW's single-tensor path as torch's CPU kernels evaluate them
// (measured against torch 2.13, AVX2 build): lerp_ and addcmul_ use one fused multiply-add where
// the CPU has FMA, mul_ / div / add_ / addcdiv_ round every operation. FUSED mirrors that, so the
// results agree with torch.optim.AdamW to the last bit or nearly.
template <bool FUSED, bool AMSGRAD, bool SMALL_W1>
inline __attribute__((always_inline)) void adamw_span_impl(float* __restrict p, const float* __restrict g,
                                                           float* __restrict m, float* __restrict v,
                                                           float* __restrict vmax, int64_t len,
                                                           const AdamwScalars& s) {
  const float one_minus_w1 = 1.0f - s.w1;
  const float neg_step_size = -s.step_size;
  for (int64_t k = 0; k < len; ++k) {
    const float gk = g[k] * s.gscale;
    const float pk = p[k] * s.decay;
    const float diff = gk - m[k];
    const float mk = SMALL_W1 ? madd<FUSED>(s.w1, diff, m[k]) : madd<FUSED>(-diff, one_minus_w1, gk);
    const float vk = madd<FUSED>(s.omb2 * gk, gk, v[k] * s.b2);
    float vv = vk;
    if (AMSGRAD) {
      vv = (vmax[k] > vk || vmax[k] != vmax[k]) ? vmax[k] : vk;  // torch.maximum: NaN wins
      vmax[k] = vv;
    }
    const float denom = std::sqrt(vv) / s.bc2_sqrt + s.eps;
    p[k] = pk + neg_step_size * mk / denom;
    m[k] = mk;
    v[k] = vk;
  }
}

template <bool FUSED>
inline __attribute__((always_inline)) void adamw_span_body(float* __restrict p, const float* __restrict g,
                                                           float* __restrict m, float* __restrict v,
                                                           float* __restrict vmax, int64_t len,
                                                           const AdamwScalars& s, bool amsgrad) {
  const bool small = std::abs(s.w1) < 0.5f;  // torch's lerp switches formula at weight 0.5
  if (amsgrad) {
    small ? adamw_span_impl<FUSED, true, true>(p, g, m, v, vmax, len, s)
          : adamw_span_impl<FUSED, true, false>(p, g, m, v, vmax, len, s);
  } else {
    small ? adamw_span_impl<FUSED, false, true>(p, g, m, v, vmax, len, s)
          : adamw_span_impl<FUSED, false, false>(p, g, m, v, vmax, len, s);
  }
}

// Baseline x86-64 (or any other target) build of the loop, vectorised for the default ISA.
void adamw_span_default(float* p, const float* g, float* m, float* v, float* vmax, int64_t len,
                        const AdamwScalars& s, bool amsgrad) {
  adamw_span_body<false>(p, g, m, v, vmax, len, s, amsgrad);
}

// The shipped library must run on any x86-64 (no -march=native), so the AVX2+FMA version is a
// second copy compiled for that target and chosen at run time.
#if defined(__GNUC__) && defined(__x86_64__)
#define KS_HAVE_AVX2_CLONE 1
__attribute__((target("avx2,fma"))) void adamw_span_avx2(float* p, const float* g, float* m, float* v,
                                                         float* vmax, int64_t len, const AdamwScalars& s,
                                                         bool amsgrad) {
  adamw_span_body<true>(p, g, m, v, vmax, len, s, amsgrad);
}
#endif

using AdamwSpanFn = void (*)(float*, const float*, float*, float*, float*, int64_t, const AdamwScalars&, bool);

AdamwSpanFn pick_adamw_span() {
#ifdef KS_HAVE_AVX2_CLONE
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &adamw_span_avx2;
#endif
  return &adamw_span_default;
}

// w[r(i), c(j)] = rne(src[e - e0]) for the elements [e0, e1) of one [n, m] keystone tensor.
template <typename scalar_t>
void scatter_span(scalar_t* w, int64_t ws0, int64_t ws1, const int64_t* rows, const int64_t* cols, int64_t m,
                  const float* src, int64_t e0, int64_t e1) {
  if (ws0 == 1 && rows == nullptr && cols != nullptr) {
    // A column-major target (KeystoneLinear.frozen_storage): column by column, each a contiguous run of
    // rows, so the stores stream instead of jumping a column apart at every element. The values come
    // from the span just updated (in cache), read with a stride of m.
    for (int64_t j = 0; j < m; ++j) {
      scalar_t* wcol = w + cols[j] * ws1;
      const int64_t first = e0 / m + (e0 % m > j ? 1 : 0);  // the first row i with i * m + j >= e0
      for (int64_t i = first, e = first * m + j; e < e1; ++i, e += m) wcol[i] = static_cast<scalar_t>(src[e - e0]);
    }
    return;
  }
  int64_t i = e0 / m, j = e0 % m;
  for (int64_t e = e0; e < e1; ++i, j = 0) {
    const int64_t len = std::min(m - j, e1 - e);
    scalar_t* wrow = w + (rows != nullptr ? rows[i] : i) * ws0;
    const float* s = src + (e - e0);
    if (cols != nullptr) {
      for (int64_t k = 0; k < len; ++k) wrow[cols[j + k] * ws1] = static_cast<scalar_t>(s[k]);
    } else {
      for (int64_t k = 0; k < len; ++k) wrow[(j + k) * ws1] = static_cast<scalar_t>(s[k]);
    }
    e += len;
  }
}

// One AdamW step over the flat arenas, each block of the block table followed by the scatter of
// its elements into the tensor's frozen target (keystone_kernels/ops/layout.py has the tables).
void fused_adamw_scatter_cpu(const Tensor& master, const Tensor& grad, const Tensor& exp_avg,
                             const Tensor& exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq,
                             at::TensorList weights, const Tensor& segments, const Tensor& index,
                             const Tensor& blocks, const std::optional<Tensor>& scalars, int64_t block, double decay,
                             double step_size, double bc2_sqrt, double grad_scale, double beta1, double beta2,
                             double eps) {
  constexpr const char* op = kAdamwOp;
  check_adamw_args(master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, index, blocks, scalars, block,
                   beta1, beta2);
  TORCH_CHECK(master.device().is_cpu(), op, ": the arenas must be CPU tensors here, got ", master.device());
  AdamwScalars s;
  if (scalars.has_value()) {  // capturable: the step's scalars were computed as tensors
    const float* sv = scalars->const_data_ptr<float>();
    if (sv[4] != 0.0f) return;  // a skipped (non-finite) step changes nothing
    s.decay = sv[0], s.step_size = sv[1], s.bc2_sqrt = sv[2], s.gscale = sv[3];
  } else {
    s.decay = static_cast<float>(decay), s.step_size = static_cast<float>(step_size);
    s.bc2_sqrt = static_cast<float>(bc2_sqrt), s.gscale = static_cast<float>(grad_scale);
  }
  s.w1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.omb2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);

  // O(S + K) host checks, so that a hand-made table cannot write out of bounds: every segment
  // fits its arena, its target is the listed weight, and its indices are in range.
  const int64_t S = segments.size(0), K = index.numel(), numel = master.numel();
  const int64_t* seg = segments.const_data_ptr<int64_t>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < S; ++k) {
    const int64_t* r = seg + k * kSegWidth;
    const int64_t n = r[kSegN], m = r[kSegM];
    TORCH_CHECK(n >= 0 && m >= 0 && r[kSegOffset] >= 0 && r[kSegOffset] + n * m <= numel, op, ": segment ", k,
                " does not fit the arenas");
    if (r[kSegWslot] < 0) continue;
    TORCH_CHECK(r[kSegWslot] < static_cast<int64_t>(weights.size()), op, ": segment ", k, " names weights[",
                r[kSegWslot], "], there are ", weights.size());
    const Tensor& w = weights[r[kSegWslot]];
    check_weight(w, op, at_index("weights", r[kSegWslot]));
    TORCH_CHECK(w.device().is_cpu() && w.stride(0) == r[kSegWs0] && w.stride(1) == r[kSegWs1], op,
                ": weights[", r[kSegWslot], "] is not the CPU tensor of the layout (strides or device changed)");
    for (const auto& [at, count, bound, name] : {std::tuple<int64_t, int64_t, int64_t, const char*>{
                                                     r[kSegRowsAt], n, w.size(0), "row"},
                                                 {r[kSegColsAt], m, w.size(1), "column"}}) {
      if (at < 0) {
        TORCH_CHECK(count <= bound, op, ": segment ", k, " has more ", name, "s than its target");
        continue;
      }
      TORCH_CHECK(at + count <= K, op, ": segment ", k, "'s ", name, " indices run past the index table");
      for (int64_t q = 0; q < count; ++q) {
        TORCH_CHECK(idx[at + q] >= 0 && idx[at + q] < bound, op, ": segment ", k, " ", name, " index ",
                    idx[at + q], " is out of range [0, ", bound, ")");
      }
    }
  }
  const int64_t B = blocks.size(0);
  const int64_t* blk = blocks.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(blk[2 * b] >= 0 && blk[2 * b] < S && blk[2 * b + 1] >= 0, op, ": block ", b, " is out of range");
  }

  float* p = master.data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* m1 = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  float* vmax = max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<float>() : nullptr;
  const bool amsgrad = vmax != nullptr;
  static const AdamwSpanFn adamw_span = pick_adamw_span();
  // A few blocks per task: two cores share one big tensor as well as many small ones.
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* r = seg + blk[2 * b] * kSegWidth;
      const int64_t n = r[kSegN], m = r[kSegM], start = blk[2 * b + 1];
      const int64_t end = std::min(n * m, start + block);
      if (start >= end) continue;
      const int64_t e = r[kSegOffset] + start;
      adamw_span(p + e, g + e, m1 + e, v + e, amsgrad ? vmax + e : nullptr, end - start, s, amsgrad);
      if (r[kSegWslot] < 0) continue;
      const Tensor& w = weights[r[kSegWslot]];
      const int64_t* rows = r[kSegRowsAt] >= 0 ? idx + r[kSegRowsAt] : nullptr;
      const int64_t* cols = r[kSegColsAt] >= 0 ? idx + r[kSegColsAt] : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "keystone_adamw_scatter", [&] {
        scatter_span<scalar_t>(static_cast<scalar_t*>(w.data_ptr()), r[kSegWs0], r[kSegWs1], rows, cols, m,
                               p + e, start, end);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY(keystone, m) {
  m.def("gather_wgrad(Tensor grad_out, Tensor x, Tensor? rows, Tensor? cols) -> Tensor");
  m.def("scatter_to_frozen(Tensor(a!) weight, Tensor src, Tensor? rows, Tensor? cols) -> ()");
  m.def(
      "fused_adamw_scatter(Tensor(a!) master, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!)[] weights, Tensor segments, Tensor index, Tensor blocks, "
      "Tensor? scalars, int block, float decay, float step_size, float bc2_sqrt, float grad_scale, float beta1, "
      "float beta2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(keystone, CPU, m) {
  m.impl("gather_wgrad", &gather_wgrad_cpu);
  m.impl("scatter_to_frozen", &scatter_to_frozen_cpu);
  m.impl("fused_adamw_scatter", &fused_adamw_scatter_cpu);
}

}  // namespace keystone

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

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace keystone {
namespace {

using at::Tensor;

// Checks shared by every CPU kernel. The Python layer (keystone_kernels/ops/dispatch.py) validates
// first with ValueErrors; these keep a direct torch.ops.keystone call from corrupting memory.
void check_index(const std::optional<Tensor>& idx, const char* op, const char* name, int64_t bound) {
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

// out[t, j] = float(in[t, idx[j]]) (or in[t, j] when idx is absent): one pass that gathers and
// upcasts into a contiguous fp32 [T, n] buffer, the shape BLAS wants.
Tensor gather_cols_f32(const Tensor& in, const std::optional<Tensor>& idx) {
  const int64_t T = in.size(0);
  const int64_t n = idx.has_value() ? idx->numel() : in.size(1);
  if (!idx.has_value() && in.scalar_type() == at::kFloat) return in;  // at::mm handles any strides
  Tensor out = at::empty({T, n}, in.options().dtype(at::kFloat));
  if (T == 0 || n == 0) return out;
  const Tensor ci = idx.has_value() ? idx->contiguous() : Tensor();
  const int64_t* ip = idx.has_value() ? ci.data_ptr<int64_t>() : nullptr;
  const int64_t s0 = in.stride(0), s1 = in.stride(1);
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "keystone_gather_cols", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = src + t * s0;
        float* dst = op + t * n;
        if (ip != nullptr) {
          for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[ip[j] * s1]);
        } else {
          for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(row[j * s1]);
        }
      }
    });
  });
  return out;
}

// dW[rows][:, cols] = grad_out[:, rows]^T @ x[:, cols] in fp32. On the CPU a BLAS GEMM beats any
// hand-written loop, so the kernel is: gather + upcast the needed columns, then one at::mm.
Tensor gather_wgrad_cpu(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& rows,
                        const std::optional<Tensor>& cols) {
  constexpr const char* op = "keystone::gather_wgrad";
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [T, out], got shape ", grad_out.sizes());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, in], got shape ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out and x must have the same number of rows T, got ",
              grad_out.size(0), " and ", x.size(0));
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

void check_weight(const Tensor& weight, const char* op, const char* name) {
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

}  // namespace

TORCH_LIBRARY(keystone, m) {
  m.def("gather_wgrad(Tensor grad_out, Tensor x, Tensor? rows, Tensor? cols) -> Tensor");
  m.def("scatter_to_frozen(Tensor(a!) weight, Tensor src, Tensor? rows, Tensor? cols) -> ()");
}

TORCH_LIBRARY_IMPL(keystone, CPU, m) {
  m.impl("gather_wgrad", &gather_wgrad_cpu);
  m.impl("scatter_to_frozen", &scatter_to_frozen_cpu);
}

}  // namespace keystone

// keystone-kernels: CUDA implementations of the keystone ops (compiled only in CUDA builds).
//
// A thin binding: argument checks with messages, stream and device selection, output allocation,
// then the plain-CUDA launchers of csrc/cuda/*.cu (declared in keystone_cuda.h). Only light
// headers: c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers this binding does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../op_checks.h"
#include "keystone_cuda.h"

namespace keystone {
namespace {

using at::Tensor;

int ks_dtype(at::ScalarType t, const char* op, const std::string& name) {
  switch (t) {
    case at::kFloat: return KS_FLOAT32;
    case at::kBFloat16: return KS_BFLOAT16;
    case at::kHalf: return KS_FLOAT16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t);
  return -1;
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* op, const std::string& name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              " like the other arguments, got ", t.device());
}

// Shape, dtype and device only: checking index values would need a device sync on every call;
// keystone_kernels.ops validates them once per index tensor before calling.
const int64_t* index_ptr(const std::optional<Tensor>& idx, const Tensor& ref, const char* op, const std::string& name,
                         Tensor& keep) {
  if (!idx.has_value()) return nullptr;
  TORCH_CHECK(idx->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", idx->scalar_type());
  TORCH_CHECK(idx->dim() == 1, op, ": ", name, " must be 1-D, got shape ", idx->sizes());
  check_cuda(*idx, ref, op, name);
  keep = idx->contiguous();
  return keep.const_data_ptr<int64_t>();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

Tensor gather_wgrad_cuda(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& rows,
                         const std::optional<Tensor>& cols) {
  constexpr const char* op = kWgradOp;
  check_wgrad_shapes(grad_out, x);
  const int dtype = ks_dtype(grad_out.scalar_type(), op, "grad_out");
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), op, ": x must have grad_out's dtype ",
              grad_out.scalar_type(), ", got ", x.scalar_type());
  check_cuda(grad_out, grad_out, op, "grad_out");
  check_cuda(x, grad_out, op, "x");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  Tensor rows_c, cols_c;
  const int64_t* rp = index_ptr(rows, grad_out, op, "rows", rows_c);
  const int64_t* cp = index_ptr(cols, grad_out, op, "cols", cols_c);
  const int64_t T = grad_out.size(0);
  const int64_t n = rows.has_value() ? rows->numel() : grad_out.size(1);
  const int64_t m = cols.has_value() ? cols->numel() : x.size(1);
  const auto opts = grad_out.options().dtype(at::kFloat);
  if (T == 0 || n == 0 || m == 0) return at::zeros({n, m}, opts);
  const int64_t splits = ks_gather_wgrad_splits(T, n, m, grad_out.get_device());
  const int64_t t_per_split = ks_gather_wgrad_tokens_per_split(T, splits);
  const int64_t used = (T + t_per_split - 1) / t_per_split;  // no empty slice
  Tensor out = used == 1 ? at::empty({n, m}, opts) : at::empty({used, n, m}, opts);
  check_launch(ks_gather_wgrad_launch(grad_out.const_data_ptr(), x.const_data_ptr(), dtype, rp, cp,
                                      out.data_ptr<float>(), T, n, m, grad_out.stride(0), grad_out.stride(1),
                                      x.stride(0), x.stride(1), used, t_per_split,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return used == 1 ? out : out.sum(0);
}

void scatter_to_frozen_cuda(const Tensor& weight, const Tensor& src, const std::optional<Tensor>& rows,
                            const std::optional<Tensor>& cols) {
  constexpr const char* op = "keystone::scatter_to_frozen";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  const int dtype = ks_dtype(weight.scalar_type(), op, "weight");
  TORCH_CHECK(src.scalar_type() == at::kFloat, op, ": src must be float32, got ", src.scalar_type());
  check_cuda(weight, weight, op, "weight");
  check_cuda(src, weight, op, "src");
  const c10::cuda::CUDAGuard guard(weight.device());
  Tensor rows_c, cols_c;
  const int64_t* rp = index_ptr(rows, weight, op, "rows", rows_c);
  const int64_t* cp = index_ptr(cols, weight, op, "cols", cols_c);
  const int64_t n = rows.has_value() ? rows->numel() : weight.size(0);
  const int64_t m = cols.has_value() ? cols->numel() : weight.size(1);
  TORCH_CHECK(src.dim() == 2 && src.size(0) == n && src.size(1) == m, op, ": src must have shape [", n, ", ", m,
              "] (len(rows) or out, len(cols) or in), got ", src.sizes());
  if (n == 0 || m == 0) return;
  const Tensor s = src.contiguous();
  check_launch(ks_scatter_to_frozen_launch(weight.data_ptr(), dtype, weight.stride(0), weight.stride(1),
                                           s.const_data_ptr<float>(), rp, cp, n, m,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

// The tables live on the device and were validated once by keystone_kernels/ops/layout.py; here
// only dtypes, shapes and devices are checked (reading their values would cost a device sync).
void fused_adamw_scatter_cuda(const Tensor& master, const Tensor& grad, const Tensor& exp_avg,
                              const Tensor& exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq,
                              at::TensorList weights, const Tensor& segments, const Tensor& index,
                              const Tensor& blocks, const std::optional<Tensor>& scalars, int64_t block,
                              double decay, double step_size, double bc2_sqrt, double grad_scale, double beta1,
                              double beta2, double eps) {
  constexpr const char* op = kAdamwOp;
  check_adamw_args(master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, index, blocks, scalars, block,
                   beta1, beta2);
  TORCH_CHECK(master.is_cuda(), op, ": master must be a CUDA tensor, got ", master.device());
  TORCH_CHECK(block == KS_ADAMW_CHUNK, op, ": the block table was built for ", block,
              "-element blocks; the CUDA kernel takes ", KS_ADAMW_CHUNK);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(master.const_data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(exp_avg.const_data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(exp_avg_sq.const_data_ptr()) % 16 == 0 &&
                  (!max_exp_avg_sq.has_value() ||
                   reinterpret_cast<uintptr_t>(max_exp_avg_sq->const_data_ptr()) % 16 == 0),
              op, ": the arenas must be 16-byte aligned (allocate them whole, not as offset views)");
  for (size_t k = 0; k < weights.size(); ++k) {
    ks_dtype(weights[k].scalar_type(), op, at_index("weights", static_cast<int64_t>(k)));
    check_cuda(weights[k], master, op, at_index("weights", static_cast<int64_t>(k)));
  }
  if (blocks.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(master.device());
  KsAdamwArenas a{master.data_ptr<float>(), grad.const_data_ptr<float>(), exp_avg.data_ptr<float>(),
                  exp_avg_sq.data_ptr<float>(),
                  max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<float>() : nullptr};
  KsAdamwScalars s{};
  s.decay = static_cast<float>(decay);
  s.step_size = static_cast<float>(step_size);
  s.bc2_sqrt = static_cast<float>(bc2_sqrt);
  s.gscale = static_cast<float>(grad_scale);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.device_scalars = scalars.has_value() ? scalars->const_data_ptr<float>() : nullptr;
  check_launch(ks_fused_adamw_scatter_launch(a, segments.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(),
                                             blocks.const_data_ptr<int64_t>(), blocks.size(0), s,
                                             c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(keystone, CUDA, m) {
  m.impl("gather_wgrad", &gather_wgrad_cuda);
  m.impl("scatter_to_frozen", &scatter_to_frozen_cuda);
  m.impl("fused_adamw_scatter", &fused_adamw_scatter_cuda);
}

}  // namespace keystone

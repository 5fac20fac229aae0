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

#include "../adamw_args.h"
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
  constexpr const char* op = "keystone::gather_wgrad";
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [T, out], got shape ", grad_out.sizes());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, in], got shape ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out and x must have the same number of rows T, got ",
              grad_out.size(0), " and ", x.size(0));
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

void fused_adamw_scatter_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList weights,
                              const c10::List<std::optional<Tensor>>& rows,
                              const c10::List<std::optional<Tensor>>& cols, at::ArrayRef<double> lrs,
                              at::ArrayRef<double> weight_decays, at::IntArrayRef steps, double beta1, double beta2,
                              double eps, bool amsgrad, bool maximize, double grad_scale) {
  constexpr const char* op = kAdamwOp;
  check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, weights, rows, cols, lrs, weight_decays,
                    steps, beta1, beta2, amsgrad);
  const size_t count = params.size();
  if (count == 0) return;
  const Tensor& ref = params[0];
  TORCH_CHECK(ref.is_cuda(), op, ": params[0] must be a CUDA tensor, got ", ref.device());
  const c10::cuda::CUDAGuard guard(ref.device());

  std::vector<KsAdamwTensor> tensors;
  std::vector<KsAdamwBlock> blocks;
  std::vector<Tensor> keep;  // contiguous index tensors, alive until the launch is queued
  tensors.reserve(count);
  for (size_t k = 0; k < count; ++k) {
    const Tensor& p = params[k];
    for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&p, "params"}, {&grads[k], "grads"},
                                  {&exp_avgs[k], "exp_avgs"}, {&exp_avg_sqs[k], "exp_avg_sqs"}}) {
      check_adamw_state(*t, p, name, k);
      check_cuda(*t, ref, op, at_index(name, k));
    }
    if (amsgrad) {
      check_adamw_state(max_exp_avg_sqs[k], p, "max_exp_avg_sqs", k);
      check_cuda(max_exp_avg_sqs[k], ref, op, at_index("max_exp_avg_sqs", k));
    }
    const Tensor& w = weights[k];
    TORCH_CHECK(w.dim() == 2, op, ": weights[", k, "] must be 2-D [out, in], got shape ", w.sizes());
    const int wdtype = ks_dtype(w.scalar_type(), op, at_index("weights", k));
    check_cuda(w, ref, op, at_index("weights", k));
    Tensor r_c, c_c;
    const int64_t* rp = index_ptr(rows.get(k), ref, op, at_index("rows", k), r_c);
    const int64_t* cp = index_ptr(cols.get(k), ref, op, at_index("cols", k), c_c);
    if (rp != nullptr) keep.push_back(r_c);
    if (cp != nullptr) keep.push_back(c_c);
    const int64_t n = rp != nullptr ? r_c.numel() : w.size(0);
    const int64_t mcols = cp != nullptr ? c_c.numel() : w.size(1);
    check_adamw_target(p, n, mcols, k);

    const AdamwTensorScalars ts = adamw_tensor_scalars(lrs[k], weight_decays[k], steps[k], beta1, beta2);
    KsAdamwTensor t{};
    t.p = p.data_ptr<float>();
    t.g = grads[k].const_data_ptr<float>();
    t.m = exp_avgs[k].data_ptr<float>();
    t.v = exp_avg_sqs[k].data_ptr<float>();
    t.vmax = amsgrad ? max_exp_avg_sqs[k].data_ptr<float>() : nullptr;
    t.w = w.data_ptr();
    t.rows = rp;
    t.cols = cp;
    t.n = n;
    t.mcols = mcols;
    t.ws0 = w.stride(0);
    t.ws1 = w.stride(1);
    t.decay = ts.decay;
    t.step_size = ts.step_size;
    t.bc2_sqrt = ts.bc2_sqrt;
    t.wdtype = wdtype;
    const int64_t index = static_cast<int64_t>(tensors.size());
    tensors.push_back(t);
    for (int64_t start = 0; start < n * mcols; start += KS_ADAMW_CHUNK) blocks.push_back({index, start});
  }
  if (blocks.empty()) return;

  // One host-to-device copy of both tables, from pinned memory, ordered on the current stream.
  const size_t tensor_bytes = tensors.size() * sizeof(KsAdamwTensor);
  const size_t block_bytes = blocks.size() * sizeof(KsAdamwBlock);
  static_assert(sizeof(KsAdamwTensor) % alignof(KsAdamwBlock) == 0, "blocks follow tensors, aligned");
  Tensor host = at::empty({static_cast<int64_t>(tensor_bytes + block_bytes)},
                          at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tensors.data(), tensor_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + tensor_bytes, blocks.data(), block_bytes);
  const Tensor dev = host.to(ref.device(), /*non_blocking=*/true);
  const auto* dev_tensors = reinterpret_cast<const KsAdamwTensor*>(dev.const_data_ptr());
  const auto* dev_blocks =
      reinterpret_cast<const KsAdamwBlock*>(static_cast<const char*>(dev.const_data_ptr()) + tensor_bytes);

  KsAdamwScalars s{};
  s.gscale = static_cast<float>(maximize ? -grad_scale : grad_scale);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.amsgrad = amsgrad ? 1 : 0;
  check_launch(ks_fused_adamw_scatter_launch(dev_tensors, dev_blocks, static_cast<int64_t>(blocks.size()), s,
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

// keystone::fused_adamw_scatter: the argument checks and per-tensor scalars shared by the CPU
// kernel (keystone.cpp) and the CUDA binding (cuda/keystone_cuda.cpp), so that both backends
// accept the same arguments and compute the same fp32 constants.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace keystone {

constexpr const char* kAdamwOp = "keystone::fused_adamw_scatter";

// One entry per param in every list (max_exp_avg_sqs only with amsgrad); betas in [0, 1).
inline void check_adamw_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& rows,
                              const c10::List<std::optional<at::Tensor>>& cols, at::ArrayRef<double> lrs,
                              at::ArrayRef<double> weight_decays, at::IntArrayRef steps, double beta1, double beta2,
                              bool amsgrad) {
  const size_t count = params.size();
  const auto check_len = [&](size_t len, const char* name) {
    TORCH_CHECK(len == count, kAdamwOp, ": ", name, " has ", len, " entries, params has ", count);
  };
  check_len(grads.size(), "grads");
  check_len(exp_avgs.size(), "exp_avgs");
  check_len(exp_avg_sqs.size(), "exp_avg_sqs");
  check_len(weights.size(), "weights");
  check_len(rows.size(), "rows");
  check_len(cols.size(), "cols");
  check_len(lrs.size(), "lrs");
  check_len(weight_decays.size(), "weight_decays");
  check_len(steps.size(), "steps");
  if (amsgrad) check_len(max_exp_avg_sqs.size(), "max_exp_avg_sqs");
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, kAdamwOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, kAdamwOp, ": beta2 must be in [0, 1), got ", beta2);
  for (size_t k = 0; k < count; ++k) {
    TORCH_CHECK(steps[k] >= 1, kAdamwOp, ": steps[", k, "] must be >= 1, got ", steps[k]);
  }
}

// params[k] and its optimizer state: contiguous float32 of params[k]'s 2-D shape (device: caller).
inline void check_adamw_state(const at::Tensor& t, const at::Tensor& param, const char* name, size_t k) {
  TORCH_CHECK(param.dim() == 2, kAdamwOp, ": params[", k, "] must be 2-D, got shape ", param.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == param.sizes(), kAdamwOp, ": ",
              name, "[", k, "] must be a contiguous float32 tensor of params[", k, "]'s shape ", param.sizes(),
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

// params[k] is the [len(rows) or out, len(cols) or in] sub-matrix of weights[k].
inline void check_adamw_target(const at::Tensor& param, int64_t n, int64_t mcols, size_t k) {
  TORCH_CHECK(param.size(0) == n && param.size(1) == mcols, kAdamwOp, ": params[", k, "] must have shape [", n, ", ",
              mcols, "] (len(rows[", k, "]) or out, len(cols[", k, "]) or in), got ", param.sizes());
}

// The per-tensor constants, computed in double as torch.optim.AdamW does in Python, then fp32.
struct AdamwTensorScalars {
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
};

inline AdamwTensorScalars adamw_tensor_scalars(double lr, double weight_decay, int64_t step, double beta1,
                                               double beta2) {
  const double s = static_cast<double>(step);
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr / (1.0 - std::pow(beta1, s))),
          static_cast<float>(std::sqrt(1.0 - std::pow(beta2, s)))};
}

inline std::string at_index(const char* name, size_t k) { return std::string(name) + "[" + std::to_string(k) + "]"; }

}  // namespace keystone

// Argument checks shared by the CPU kernels (keystone.cpp) and the CUDA binding
// (cuda/keystone_cuda.cpp), so that both backends accept the same arguments with the same
// messages; and the flat-layout tables of keystone::fused_adamw_scatter, built once by
// keystone_kernels/ops/layout.py (see its docstring).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace keystone {

constexpr const char* kAdamwOp = "keystone::fused_adamw_scatter";
constexpr const char* kWgradOp = "keystone::gather_wgrad";

// gather_wgrad: grad_out [T, out] and x [T, in], 2-D with the same T (dtypes: the caller).
inline void check_wgrad_shapes(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.dim() == 2, kWgradOp, ": grad_out must be 2-D [T, out], got shape ", grad_out.sizes());
  TORCH_CHECK(x.dim() == 2, kWgradOp, ": x must be 2-D [T, in], got shape ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), kWgradOp, ": grad_out and x must have the same number of rows T, got ",
              grad_out.size(0), " and ", x.size(0));
}

// Columns of the int64 segments table [S, kSegWidth], one row per keystone tensor.
enum SegColumn : int64_t {
  kSegOffset = 0,  // first element in the arenas
  kSegN,           // rows of the tensor
  kSegM,           // columns of the tensor
  kSegRowsAt,      // where its row indices start in `index`; -1: all rows, in order
  kSegColsAt,      // where its column indices start in `index`; -1: all columns, in order
  kSegWs0,         // strides of the frozen target, in elements
  kSegWs1,
  kSegWaddr,       // address of the frozen target (read by the CUDA kernel)
  kSegWdtype,      // 0 float32, 1 bfloat16, 2 float16; -1: no target, nothing scattered
  kSegWslot,       // position of the target in `weights`; -1: none
  kSegWidth
};
constexpr int64_t kNumScalars = 5;  // decay, step_size, bc2_sqrt, grad_scale, skip

// A 1-D contiguous float32 arena with master's size and device.
inline void check_arena(const at::Tensor& t, const at::Tensor& master, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous() && t.numel() == master.numel(),
              kAdamwOp, ": ", name, " must be a contiguous 1-D float32 arena of ", master.numel(),
              " elements, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == master.device(), kAdamwOp, ": ", name, " must be on ", master.device(), ", got ",
              t.device());
}

inline void check_table(const at::Tensor& t, const at::Tensor& master, const char* name, int64_t width) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && (width == 0 ? t.dim() == 1 : t.dim() == 2 &&
                                                                    t.size(1) == width),
              kAdamwOp, ": ", name, " must be a contiguous int64 table", width == 0 ? "" : " of width ",
              width == 0 ? "" : std::to_string(width), ", got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == master.device(), kAdamwOp, ": ", name, " must be on ", master.device(), ", got ",
              t.device());
}

// Every argument's dtype, shape and device (values of device tables are the Python layer's job).
inline void check_adamw_args(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                             const at::Tensor& segments, const at::Tensor& index, const at::Tensor& blocks,
                             const std::optional<at::Tensor>& scalars, int64_t block, double beta1, double beta2) {
  TORCH_CHECK(master.scalar_type() == at::kFloat && master.dim() == 1 && master.is_contiguous(), kAdamwOp,
              ": master must be a contiguous 1-D float32 arena, got ", master.scalar_type(), " ", master.sizes());
  check_arena(grad, master, "grad");
  check_arena(exp_avg, master, "exp_avg");
  check_arena(exp_avg_sq, master, "exp_avg_sq");
  if (max_exp_avg_sq.has_value()) check_arena(*max_exp_avg_sq, master, "max_exp_avg_sq");
  check_table(segments, master, "segments", kSegWidth);
  check_table(index, master, "index", 0);
  check_table(blocks, master, "blocks", 2);
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->scalar_type() == at::kFloat && scalars->dim() == 1 && scalars->numel() == kNumScalars &&
                    scalars->is_contiguous() && scalars->device() == master.device(),
                kAdamwOp, ": scalars must be a contiguous float32 [5] tensor on ", master.device(), ", got ",
                scalars->scalar_type(), " ", scalars->sizes(), " on ", scalars->device());
  }
  TORCH_CHECK(block > 0 && block % 16 == 0, kAdamwOp, ": block must be a positive multiple of 16, got ", block);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, kAdamwOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, kAdamwOp, ": beta2 must be in [0, 1), got ", beta2);
}

inline std::string at_index(const char* name, int64_t k) { return std::string(name) + "[" + std::to_string(k) + "]"; }

}  // namespace keystone

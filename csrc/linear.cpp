// keystone::linear: KeystoneLinear's forward and backward as a C++ autograd function.
//
// y = x W^T + b with W the frozen weight; gradients only for x and the keystone tensors (rows R of W,
// columns C of the other rows, the bias rows or the whole bias). The same math as
// keystone_kernels/nn/linear.py's _KeystoneLinearFunction, which stays the path for torch.compile and
// the other backends: here the eager backward runs without Python (its Python body was most of the
// layer's host time, bench/host_overhead.py). The weight gradients call keystone::gather_wgrad through
// the dispatcher, so CPU and CUDA tensors get the extension's own kernels.
//
// Kept out of keystone.cpp, whose headers are light on purpose: the autograd headers cost compile time.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace keystone {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The frozen tensor in the activations' dtype (an upcast copy on the CPU, where bf16 GEMMs can be slow).
Tensor compute_view(const Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

std::optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

Tensor wgrad(const Tensor& dy, const Tensor& x, const Tensor& rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keystone::gather_wgrad", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&)>();
  return op.call(dy, x, maybe(rows), std::nullopt);
}

// Inputs: x, weight_rows, weight_cols, bias_rows, frozen, frozen bias, rows, col_rows, cols, bias_all. An
// absent optional is no input of the graph, so a tensor's edge index counts the present tensors before it.
struct KeystoneLinearFn : public torch::autograd::Function<KeystoneLinearFn> {
  using Opt = std::optional<Tensor>;

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Opt& weight_rows, const Opt& weight_cols,
                        const Opt& bias_rows, const Tensor& frozen, const Opt& bias, const Tensor& rows,
                        const Opt& col_rows, const Tensor& cols, bool bias_all) {
    Tensor y = at::linear(x, compute_view(frozen, x.scalar_type()),
                          bias.has_value() ? compute_view(*bias, x.scalar_type()) : Tensor());
    const size_t rows_edge = 1, cols_edge = rows_edge + weight_rows.has_value();
    const size_t bias_edge = cols_edge + weight_cols.has_value();
    const bool need_rows = weight_rows.has_value() && ctx->needs_input_grad(rows_edge);
    const bool need_cols = weight_cols.has_value() && ctx->needs_input_grad(cols_edge);
    const bool need_bias = bias_rows.has_value() && ctx->needs_input_grad(bias_edge);
    const Tensor x2d = x.reshape({-1, x.size(-1)});
    // Columns only (o_proj / down_proj): keep |C| columns of X, not all of it.
    const Tensor saved_x = need_rows ? x2d : Tensor();
    const Tensor saved_xc = need_cols && !need_rows ? x2d.index_select(1, cols) : Tensor();
    ctx->save_for_backward({saved_x, saved_xc, frozen, rows, col_rows.value_or(Tensor()), cols});
    ctx->saved_data["need"] = c10::List<bool>({need_rows, need_cols, need_bias, bias_all, ctx->needs_input_grad(0)});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &saved_x = saved[0], &saved_xc = saved[1], &frozen = saved[2], &rows = saved[3],
                 &col_rows = saved[4], &cols = saved[5];
    const auto need = ctx->saved_data["need"].toBoolList();
    const bool need_rows = need[0], need_cols = need[1], need_bias = need[2], bias_all = need[3], need_x = need[4];
    const Tensor& grad_y = grad_outputs[0];
    const Tensor dy = grad_y.reshape({-1, grad_y.size(-1)});
    Tensor grad_x, grad_rows, grad_cols, grad_bias;
    if (need_x) grad_x = at::matmul(grad_y, compute_view(frozen, grad_y.scalar_type()));
    if (need_rows) grad_rows = wgrad(dy, saved_x.to(dy.scalar_type()), rows);
    if (need_cols) {
      const Tensor xc = saved_xc.defined() ? saved_xc : saved_x.index_select(1, cols);
      grad_cols = wgrad(dy, xc.to(dy.scalar_type()), col_rows);
    }
    if (need_bias) {
      const Tensor picked = bias_all ? dy : dy.index_select(1, rows);  // the whole bias, or its rows R
      grad_bias = picked.sum(0, /*keepdim=*/false, at::kFloat);
    }
    return {grad_x, grad_rows, grad_cols, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor keystone_linear(const Tensor& x, const std::optional<Tensor>& weight_rows,
                       const std::optional<Tensor>& weight_cols, const std::optional<Tensor>& bias_rows,
                       const Tensor& frozen, const std::optional<Tensor>& bias, const Tensor& rows,
                       const std::optional<Tensor>& col_rows, const Tensor& cols, bool bias_all) {
  const auto wants_grad = [](const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || wants_grad(weight_rows) || wants_grad(weight_cols) || wants_grad(bias_rows))) {
    // No backward will run: the forward alone (the function's needs_input_grad needs a graph).
    return at::linear(x, compute_view(frozen, x.scalar_type()),
                      bias.has_value() ? compute_view(*bias, x.scalar_type()) : Tensor());
  }
  return KeystoneLinearFn::apply(x, weight_rows, weight_cols, bias_rows, frozen, bias, rows, col_rows, cols,
                                 bias_all);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keystone, m) {
  m.def("linear(Tensor x, Tensor? weight_rows, Tensor? weight_cols, Tensor? bias_rows, Tensor frozen, "
        "Tensor? bias, Tensor rows, Tensor? col_rows, Tensor cols, bool bias_all) -> Tensor");
}

// Above autograd: the function builds its own backward node, on every device the ops support.
TORCH_LIBRARY_IMPL(keystone, CompositeImplicitAutograd, m) {
  m.impl("linear", &keystone_linear);
}

}  // namespace keystone

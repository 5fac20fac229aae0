"""KeystoneLinear against dense autograd, on every CPU backend, awkward shapes, poisoned memory."""

import pytest
import torch
from conftest import make_index, poisoned_allocations, require_backend
from torch import nn

from keystone_kernels.nn.linear import KeystoneLinear

# (leading shape, in, out)
SHAPES = [((3, 5), 37, 29), ((1, 1), 16, 16), ((7,), 13, 41), ((2, 0, 3), 8, 5)]
LAYOUTS = [("random", "empty"), ("empty", "random"), ("random", "random"), ("one", "one"), ("explicit_all", "empty"),
           ("empty", "explicit_all"), ("first_last", "explicit_all")]


def _dense_grads(weight, bias, x, grad_y):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    x = x.detach().clone().requires_grad_(True)
    y = lin(x)
    y.backward(grad_y)
    return y, x.grad, lin.weight.grad, None if bias is None else lin.bias.grad


def _rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)) if b.numel() else 0.0


@pytest.mark.parametrize("lead, n_in, n_out", SHAPES)
@pytest.mark.parametrize("row_kind, col_kind", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_frozen_matches_dense_autograd(any_backend, lead, n_in, n_out, row_kind, col_kind, with_bias, rng):
    backend, device = any_backend
    weight = torch.randn(n_out, n_in, generator=rng)
    bias = torch.randn(n_out, generator=rng) if with_bias else None
    rows = make_index(row_kind, n_out, rng)
    cols = make_index(col_kind, n_in, rng)
    x = torch.randn(*lead, n_in, generator=rng)
    grad_y = torch.randn(*lead, n_out, generator=rng)
    module = KeystoneLinear(weight, bias, rows, cols, frozen_dtype=torch.float32, backend=backend).to(device)
    frozen_before = module.frozen_weight.clone()
    xk = x.to(device).requires_grad_(True)
    with poisoned_allocations():
        y = module(xk)
        y.backward(grad_y.to(device))
    module, y, xk = module.cpu(), y.cpu(), xk.grad.cpu()
    y_ref, gx_ref, gw_ref, gb_ref = _dense_grads(weight, bias, x, grad_y)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xk, gx_ref, rtol=1e-5, atol=1e-5)
    if len(rows):
        assert _rel_err(module.weight_rows.grad, gw_ref[rows]) <= 1e-5
    else:
        assert module.weight_rows is None
    if len(cols):
        col_rows = module.col_rows if module.col_rows is not None else slice(None)
        assert _rel_err(module.weight_cols.grad, gw_ref[col_rows][:, cols]) <= 1e-5
        assert module.weight_cols.shape == (n_out - len(rows), len(cols))
    if with_bias and len(rows):
        assert _rel_err(module.bias_rows.grad, gb_ref[rows]) <= 1e-5
    assert torch.equal(module.frozen_weight, frozen_before.cpu())  # forward / backward never write the frozen matrix
    n_params = sum(p.numel() for p in module.keystone_parameters())
    assert n_params == len(rows) * n_in + (n_out - len(rows)) * len(cols) + (len(rows) if with_bias else 0)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_bf16_frozen_matches_the_bf16_reference(any_backend, act_dtype, rng):
    backend, device = any_backend
    n_out, n_in = 53, 31
    weight = torch.randn(n_out, n_in, generator=rng)
    rows, cols = make_index("random", n_out, rng), make_index("random", n_in, rng)
    module = KeystoneLinear(weight, None, rows, cols, frozen_dtype=torch.bfloat16, backend=backend)
    assert module.frozen_weight.dtype == torch.bfloat16 and module.weight_rows.dtype == torch.float32
    # the frozen store holds the RNE rounding of the weights; the masters keep full precision
    assert torch.equal(module.frozen_weight, weight.to(torch.bfloat16))
    assert torch.equal(module.weight_rows, weight[rows])
    x = torch.randn(4, 6, n_in, generator=rng).to(act_dtype)
    grad_y = torch.randn(4, 6, n_out, generator=rng).to(act_dtype)
    module.to(device)
    xk = x.to(device).requires_grad_(True)
    with poisoned_allocations():
        y = module(xk)
        y.backward(grad_y.to(device))
    module, y, xk = module.cpu(), y.cpu(), xk.grad.cpu()
    _, gx_ref, gw_ref, _ = _dense_grads(weight.to(torch.bfloat16).to(act_dtype), None, x, grad_y)
    tol = 1e-5 if act_dtype == torch.float32 else 2e-2
    assert y.dtype == act_dtype
    assert _rel_err(xk, gx_ref) <= tol
    assert _rel_err(module.weight_rows.grad, gw_ref[rows]) <= tol
    assert _rel_err(module.weight_cols.grad, gw_ref[module.col_rows][:, cols]) <= tol


def _saved_bytes(module, x):
    sizes = []

    def pack(t):
        sizes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sizes


def test_built_where_its_backend_cannot_run_then_moved(monkeypatch, rng):
    """A layer is often built on the CPU and moved to the GPU after, with backend="triton" named: building
    it must not run the Triton kernels (seen on an H200: every such test failed). Its frozen matrix
    holds the original values; a forward there still refuses the backend by name."""
    from keystone_kernels.ops import dispatch

    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: (device.type == "cuda", "no Triton on the CPU here"))
    monkeypatch.setattr(dispatch, "_routes", {})
    weight, bias = torch.randn(11, 7, generator=rng), torch.randn(11, generator=rng)
    rows, cols = make_index("random", 11, rng), make_index("random", 7, rng)
    module = KeystoneLinear(weight, bias, rows, cols, frozen_dtype=torch.float32, backend="triton")
    torch.testing.assert_close(module.frozen_weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(module.frozen_bias, bias, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend 'triton'.*cannot run on cpu"):
        module(torch.randn(3, 7, generator=rng)).sum().backward()


def test_backward_saves_only_what_the_keystone_gradients_need(rng):
    t, n_in, n_out = 11, 24, 19
    x = torch.randn(t, n_in, generator=rng)
    weight = torch.randn(n_out, n_in, generator=rng)
    rows, cols, empty = torch.tensor([2, 5]), torch.tensor([0, 7, 9]), torch.empty(0, dtype=torch.int64)

    def activations(saved):  # drop the frozen weight and the index vectors
        return [s for s in saved if len(s) == 2 and s[0] == t]

    assert (activations(_saved_bytes(KeystoneLinear(weight, None, rows, empty, torch.float32, "reference"), x))
            == [(t, n_in)])
    assert (activations(_saved_bytes(KeystoneLinear(weight, None, empty, cols, torch.float32, "reference"), x))
            == [(t, 3)])
    assert activations(_saved_bytes(KeystoneLinear(weight, None, empty, empty, torch.float32, "reference"), x)) == []


def test_conv1d_layout_and_merge(rng):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 7)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(7, 12, generator=rng))
        conv.bias.copy_(torch.randn(12, generator=rng))
    module = KeystoneLinear(conv.weight.t(), conv.bias, torch.tensor([3]), torch.tensor([1, 6]), torch.float32,
                            "reference", transposed=True)
    x = torch.randn(2, 5, 7, generator=rng)
    torch.testing.assert_close(module(x), conv(x))
    with torch.no_grad():
        module.weight_rows.add_(1.0)
        module.weight_cols.mul_(-2.0)
        module.bias_rows.add_(0.5)
    module.sync_frozen()
    weight, bias = module.merged_weight(torch.float32, masters=True)
    want = conv.weight.t().clone()
    want[3] += 1.0
    keep = torch.ones(12, dtype=torch.bool)
    keep[3] = False
    want[keep.nonzero().flatten()[:, None], torch.tensor([1, 6])] *= -2.0
    torch.testing.assert_close(weight, want, rtol=0, atol=0)
    assert torch.equal(module.frozen_weight, want) and bias[3] == conv.bias[3] + 0.5


def test_compiled_keystone_linear_matches_eager(any_backend, rng):
    """torch.compile with fullgraph=True: no graph break inside the keystone ops, on every backend."""
    backend, device = any_backend
    weight = torch.randn(23, 17, generator=rng)
    rows, cols = torch.tensor([1, 4, 22]), torch.tensor([0, 16])
    module = KeystoneLinear(weight, None, rows, cols, torch.float32, backend).to(device)
    x = torch.randn(3, 5, 17, generator=rng).to(device)

    explanation = torch._dynamo.explain(lambda inp: module(inp).square().sum())(x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    module.zero_grad(set_to_none=True)
    eager_y = module(x)
    eager_y.square().sum().backward()
    eager_grads = [p.grad.clone() for p in module.keystone_parameters()]
    assert all(g.abs().sum() > 0 for g in eager_grads)
    module.zero_grad(set_to_none=True)
    compiled = torch.compile(lambda inp: module(inp), fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    for p, g in zip(module.keystone_parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row_kind, col_kind, column_major", [
    ("empty", "random", True), ("empty", "explicit_all", True), ("random", "empty", False),
    ("random", "random", False), ("empty", "empty", False)])
def test_a_column_owned_layer_stores_its_frozen_weight_column_major(row_kind, col_kind, column_major, rng):
    """Keystone columns and no rows (o_proj / down_proj): an [out, in] view of an [in, out] buffer, so that the
    optimizer's scatter of a column is contiguous; every other mask keeps row-major. Readers see [out, in]."""
    n_out, n_in = 29, 37
    w = torch.randn(n_out, n_in, generator=rng)
    layer = KeystoneLinear(w, None, make_index(row_kind, n_out, rng), make_index(col_kind, n_in, rng),
                           torch.bfloat16, "reference")
    f = layer.frozen_weight
    assert f.shape == (n_out, n_in) and torch.equal(f, w.bfloat16())
    assert f.stride() == ((1, n_out) if column_major else (n_in, 1))
    assert f.t().is_contiguous() == column_major
    merged, _ = layer.merged_weight()
    assert merged.is_contiguous() and torch.equal(merged, f)  # what export and save_pretrained write
    layer.to(torch.float32)  # .to() / .half() keep the orientation
    assert layer.frozen_weight.stride() == f.stride() and layer.frozen_weight.dtype == torch.float32


@pytest.mark.parametrize("col_kind", ["random", "one", "explicit_all"])
def test_column_major_and_row_major_storage_train_bit_for_bit_alike(any_backend, col_kind, rng):
    """The same keystone columns stepped by KeystoneAdamW with the frozen weight column-major (the layer's choice)
    and forced row-major: every frozen bit, forward output and gradient equal, on every backend."""
    from keystone_kernels import KeystoneAdamW

    backend, device = any_backend
    n_out, n_in = 41, 23
    w = torch.randn(n_out, n_in, generator=rng)
    cols = make_index(col_kind, n_in, rng)
    layers = [KeystoneLinear(w, None, torch.empty(0, dtype=torch.int64), cols, torch.bfloat16, backend).to(device)
              for _ in range(2)]
    layers[1].frozen_weight = layers[1].frozen_weight.contiguous()
    assert layers[0].frozen_weight.stride() == (1, n_out) and layers[1].frozen_weight.stride() == (n_in, 1)
    opts = [KeystoneAdamW(layer.keystone_parameters(), lr=3e-2, backend=backend) for layer in layers]
    x = torch.randn(5, n_in, generator=rng).to(device)
    for step in range(3):
        grad_y = torch.randn(5, n_out, generator=torch.Generator().manual_seed(step)).to(device)
        outs = []
        for layer, opt in zip(layers, opts):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(grad_y)
            outs.append((y.detach(), xi.grad, layer.weight_cols.grad.clone()))
            opt.step()
            opt.zero_grad()
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # a GEMM over another layout may sum in another order
        assert torch.equal(layers[0].frozen_weight, layers[1].frozen_weight)  # the scatter itself: bit for bit
        assert torch.equal(layers[0].weight_cols, layers[1].weight_cols)


def test_a_column_scatter_spanning_several_blocks_writes_every_value(any_backend, rng):
    """A column tensor larger than one optimizer block (2048 values) whose width does not divide it, so that
    blocks start inside a row: after a step every keystone value sits in the column-major frozen weight,
    equal to a row-major twin's, and no other element moved."""
    from keystone_kernels import KeystoneAdamW

    backend, device = any_backend
    n_out, n_in = 700, 61
    w = torch.randn(n_out, n_in, generator=rng)
    cols = torch.tensor([0, 5, 17, 18, 33, 59, 60])  # 7 columns: 4900 values, blocks start at rows' 4th and 1st
    layers = [KeystoneLinear(w, None, torch.empty(0, dtype=torch.int64), cols, torch.bfloat16, backend).to(device)
              for _ in range(2)]
    layers[1].frozen_weight = layers[1].frozen_weight.contiguous()
    before = layers[0].frozen_weight.clone()
    for layer in layers:
        opt = KeystoneAdamW(layer.keystone_parameters(), lr=0.5, backend=backend)  # big enough to move every value
        grad = torch.randn(layer.weight_cols.shape, generator=torch.Generator().manual_seed(1))
        layer.weight_cols.grad = grad.to(device)
        opt.step()
    f = layers[0].frozen_weight
    assert f.stride() == (1, n_out) and torch.equal(f, layers[1].frozen_weight)
    assert torch.equal(f[:, cols.to(device)], layers[0].weight_cols.detach().bfloat16())
    others = torch.ones(n_in, dtype=torch.bool)
    others[cols] = False
    assert torch.equal(f[:, others.to(device)], before[:, others.to(device)])
    assert not torch.equal(f[:, cols.to(device)], before[:, cols.to(device)])


def test_the_extension_runs_the_layer_in_cpp_and_the_others_in_python(rng):
    """backend="ext" (eager, plain tensors): keystone::linear, a C++ autograd function with no Python in the
    backward; its outputs and gradients are the Python function's, and without grad it is a plain forward."""
    require_backend("ext", "cpu")
    w, x = torch.randn(29, 37, generator=rng), torch.randn(3, 5, 37, generator=rng)
    rows, cols = torch.tensor([2, 11, 28]), torch.tensor([0, 7, 36])
    bias = torch.randn(29, generator=rng)
    cpp = KeystoneLinear(w, bias, rows, cols, torch.bfloat16, "ext")
    py = KeystoneLinear(w, bias, rows, cols, torch.bfloat16, "reference")
    grad_y = torch.randn(3, 5, 29, generator=rng)
    outs = []
    for layer in (cpp, py):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad_y)
        outs.append((y.grad_fn.name(), y, xi.grad, *(p.grad for p in layer.keystone_parameters())))
    assert "KeystoneLinearFn" in outs[0][0] and outs[1][0] == "_KeystoneLinearFunctionBackward"
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(cpp(x), outs[0][1].detach())

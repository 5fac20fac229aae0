"""KeystoneAdamW under torch.compile and CUDA graphs: the layout it points into never changes behind a
compiled or captured step, a scheduler's lr reaches it, and a step needs no host sync.

Each layer tells the optimizers that point into it when its memory moves (nothing else does), a
rebuild after a compiled step is refused with an error that says what to do, a frozen weight
replaced behind the optimizer's back is caught, and index checks run when a layer is built.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import bits, gpu, require_backend, requires_cuda
from tiny import tiny_model

from keystone_kernels import KeystoneAdamW, KeystoneLinear, KeystoneMask, keystone_parameters, patch

MASK = {
    ("attn_q", 0, None): [2, 3, 47],
    ("attn_o", 0, None): [0, 29],
    ("fwd_down", 0, None): [5, 7, 11, 71],
    ("res_mlp", 0, None): [1, 30],
    ("fwd_up", 1, None): [0, 4, 9],
    ("res_attn", 1, None): [13],
}


def _model(backend="reference", seed=0, device="cpu", frozen_dtype=torch.float32):
    model = tiny_model("llama", seed=seed).to(device)
    return patch(model, KeystoneMask(MASK), frozen_dtype=frozen_dtype, backend=backend).train()


def _ids(device="cpu", seed=7):
    return torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(seed)).to(device)


def _backward(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, KeystoneLinear)]


# ---------------------------------------------------------------------------- targeted invalidation


def test_only_the_optimizers_own_layers_invalidate_its_layout():
    """Moving or freeing another patched model leaves an optimizer's arenas where they are; moving its own
    model rebuilds them (the keystone tensors are views of the arenas, so their addresses tell)."""
    model, other = _model(seed=0), _model(seed=1)
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2)
    ids = _ids()
    _backward(model, ids)
    opt.step()
    addresses = [p.data_ptr() for p in keystone_parameters(model)]
    other.to("cpu")  # runs every layer's _apply
    del other
    gc.collect()
    opt.zero_grad()
    _backward(model, ids)
    opt.step()
    assert [p.data_ptr() for p in keystone_parameters(model)] == addresses
    model.to("cpu")
    opt.zero_grad()
    _backward(model, ids)
    opt.step()
    assert [p.data_ptr() for p in keystone_parameters(model)] != addresses


@pytest.mark.parametrize("how", ["setattr", "load_state_dict_assign"])
def test_a_replaced_frozen_weight_is_detected_and_trained(how):
    """A frozen weight swapped for another tensor (``layer.frozen_weight = t``, or ``load_state_dict(assign=True)``)
    receives the next step's keystone values: the optimizer is told and rebuilds, it does not update an orphan."""
    model = _model(frozen_dtype=torch.bfloat16)
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2)
    ids = _ids()
    _backward(model, ids)
    opt.step()
    layers = _layers(model)
    if how == "setattr":
        for layer in layers:
            layer.frozen_weight = layer.frozen_weight.clone()
    else:
        fresh = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("frozen_weight")}
        model.load_state_dict(fresh, strict=False, assign=True)
    new_weights = [layer.frozen_weight for layer in layers]
    before = [w.clone() for w in new_weights]
    opt.zero_grad()
    _backward(model, ids)
    opt.step()
    for layer, w, old in zip(layers, new_weights, before):
        assert layer.frozen_weight is w
        rows, cols = layer.keystone_indices()
        if layer.weight_rows is not None:
            assert torch.equal(w[rows], layer.weight_rows.detach().to(w.dtype))
            assert not torch.equal(w[rows], old[rows])  # the step wrote into the new tensor
        if layer.weight_cols is not None:
            other_rows = [r for r in range(layer.out_features) if r not in set(rows.tolist())]
            assert torch.equal(w[other_rows][:, cols], layer.weight_cols.detach().to(w.dtype))


def test_an_in_place_load_keeps_the_layout():
    """``load_state_dict`` that copies (the default) moves nothing: the arenas stay, no rebuild."""
    model = _model()
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2)
    _backward(model, _ids())
    opt.step()
    addresses = [p.data_ptr() for p in keystone_parameters(model)]
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    opt.zero_grad()
    _backward(model, _ids())
    opt.step()
    assert [p.data_ptr() for p in keystone_parameters(model)] == addresses


def test_index_values_are_checked_when_the_layer_is_built_not_in_a_step(monkeypatch):
    """A range check reads index values on the host (a sync on a GPU, illegal under capture): the layer runs it
    when built or moved, so a train step runs none."""
    model = _model()
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, capturable=True)
    opt.build_layout()

    def no_sync(*args, **kwargs):
        raise AssertionError("an index range check ran inside the step")

    monkeypatch.setattr(torch, "aminmax", no_sync)
    for _ in range(2):
        opt.zero_grad()
        _backward(model, _ids())
        opt.step()
    assert int(opt.state[keystone_parameters(model)[0]]["step"]) == 2


# ---------------------------------------------------------------------------- capturable lr


def test_capturable_float_lr_becomes_a_device_tensor_schedulers_fill():
    """capturable=True: build_layout turns a float lr into a float64 tensor; LambdaLR then fills it in place (the
    same tensor object every step), and the steps equal those of the default mode, bit for bit."""
    a, b = _model(), _model()
    ids = _ids()
    opt_a = KeystoneAdamW(keystone_parameters(a), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, capturable=True)
    opt_b = KeystoneAdamW(keystone_parameters(b), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (s + 1))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (s + 1))
    opt_a.build_layout()
    lr = opt_a.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64
    for _ in range(4):
        for model, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
            opt.zero_grad()
            _backward(model, ids)
            opt.step()
            sched.step()
        assert opt_a.param_groups[0]["lr"] is lr and float(lr) == opt_b.param_groups[0]["lr"] < 1e-2
    for p, q in zip(keystone_parameters(a), keystone_parameters(b)):
        assert torch.equal(bits(p), bits(q))
    opt_a.param_groups[0]["lr"] = 3e-3  # a float assigned later: used, and a tensor again
    opt_b.param_groups[0]["lr"] = 3e-3
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        _backward(model, ids)
        opt.step()
    assert isinstance(opt_a.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(keystone_parameters(a), keystone_parameters(b)):
        assert torch.equal(bits(p), bits(q))


# ---------------------------------------------------------------------------- compiled steps


def test_torch_compile_of_opt_step_runs_it_eagerly_and_fullgraph_names_the_fix():
    """torch's pattern ``torch.compile(opt.step)``: the step's host checks cannot be traced, so dynamo runs it
    eagerly (the same result as an eager step); fullgraph=True fails with the reason and ``compile_step``."""
    a, b = _model(), _model()
    opt_a = KeystoneAdamW(keystone_parameters(a), lr=1e-2, capturable=True)
    opt_b = KeystoneAdamW(keystone_parameters(b), lr=1e-2, capturable=True)
    torch.compiler.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(opt_a.step)
    for _ in range(2):
        for model, step in ((a, compiled), (b, opt_b.step)):
            model.zero_grad()
            _backward(model, _ids())
            step()
    for p, q in zip(keystone_parameters(a), keystone_parameters(b)):
        assert torch.equal(bits(p), bits(q))
    assert int(opt_a.state[keystone_parameters(a)[0]]["step"]) == 2
    assert counters["stats"]["unique_graphs"] == 0  # nothing the step calls was compiled on its own either
    torch.compiler.reset()  # dynamo remembers that it skipped the frame
    with pytest.raises(Exception, match="compile_step=True"):
        torch.compile(opt_a.step, fullgraph=True)()


def test_compile_step_needs_capturable():
    with pytest.raises(ValueError, match="pass capturable=True"):
        KeystoneAdamW([torch.nn.Parameter(torch.randn(3))], compile_step=True)


@pytest.mark.parametrize("change", ["to", "frozen_weight", "add_param_group", "load_state_dict"])
def test_a_rebuild_after_a_compiled_step_is_refused(change):
    """After a compiled step, anything that would reallocate the arenas raises, naming what changed and what to
    do; build_layout() then a fresh compile works again."""
    model = _model()
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, capturable=True, compile_step={"backend": "eager"})
    torch.compiler.reset()
    step = opt.step
    _backward(model, _ids())
    step()
    saved = opt.state_dict()
    layer = _layers(model)[0]
    if change == "to":
        model.to("cpu")
        reason = "moved or cast"
    elif change == "frozen_weight":
        layer.frozen_weight = layer.frozen_weight.clone()
        reason = "frozen_weight was replaced"
    elif change == "add_param_group":
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))]})
        reason = "param group was added"
    else:
        opt.load_state_dict(saved)
        reason = "load_state_dict"
    before = [p.detach().clone() for p in keystone_parameters(model)]
    opt.zero_grad()
    _backward(model, _ids())
    with pytest.raises(RuntimeError, match=rf"(?s){reason}.*after its step was compiled.*build_layout\(\)"):
        step()
    assert all(torch.equal(p, q) for p, q in zip(keystone_parameters(model), before))
    opt.build_layout()
    torch.compiler.reset()
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(keystone_parameters(model), before))


def _compiled_counters():
    from torch._dynamo.utils import counters

    return counters


@pytest.mark.parametrize("backend", ["reference", "ext"])
def test_inductor_compiled_train_step_equals_eager(backend):
    """The whole step under inductor: the model's forward + backward (fullgraph) and the optimizer's device work
    (``compile_step``) under a scheduler, against the same in eager. One graph each (the backward is compiled with
    the forward's), no graph break, no recompile as the lr changes; losses, gradients and updates agree."""
    if backend != "reference":
        require_backend(backend, "cpu")
    eager, compiled = _model(backend), _model(backend)
    settings = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, capturable=True, backend=backend)
    opt_e = KeystoneAdamW(keystone_parameters(eager), **settings)
    opt_c = KeystoneAdamW(keystone_parameters(compiled), **settings, compile_step=True)
    sched_e = torch.optim.lr_scheduler.LambdaLR(opt_e, lambda s: 1.0 / (s + 1))
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda s: 1.0 / (s + 1))
    torch.compiler.reset()
    counters = _compiled_counters()
    counters.clear()

    def loss_of(model, ids):
        return model(input_ids=ids, labels=ids).loss

    compiled_loss = torch.compile(loss_of, fullgraph=True)
    for step in range(3):
        ids = _ids(seed=step)
        loss_e = loss_of(eager, ids)
        loss_e.backward()
        grads_e = [p.grad.clone() for p in keystone_parameters(eager)]
        opt_e.step()
        opt_e.zero_grad()
        sched_e.step()
        loss_c = compiled_loss(compiled, ids)
        loss_c.backward()
        grads_c = [p.grad.clone() for p in keystone_parameters(compiled)]
        opt_c.step()
        opt_c.zero_grad()
        sched_c.step()
        torch.testing.assert_close(loss_c.detach(), loss_e.detach(), rtol=1e-5, atol=1e-6)
        for g, h in zip(grads_c, grads_e):
            assert h.abs().sum() > 0
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
        for p, q in zip(keystone_parameters(compiled), keystone_parameters(eager)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for m, n in zip(_layers(compiled), _layers(eager)):
            torch.testing.assert_close(m.frozen_weight, n.frozen_weight, rtol=1e-5, atol=1e-6)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs == 2  # the model's, the optimizer's: no recompile
    assert not counters["graph_break"], list(counters["graph_break"])


# ---------------------------------------------------------------------------- CUDA graphs


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_scheduler_lr_reaches_a_captured_step_and_a_float_lr_is_refused(backend):
    """A step captured once in a CUDA graph and replayed under LambdaLR gives the eager capturable steps, bit for
    bit (the scheduler fills the device lr in place); a float lr assigned after capture is refused at the
    next step instead of being silently ignored by the replays."""
    require_backend(backend, "cuda")
    models = [_model(backend, device="cuda") for _ in range(2)]
    opts = [KeystoneAdamW(keystone_parameters(m), lr=1e-2, capturable=True, backend=backend) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in opts]
    ids = _ids("cuda")
    for m, o in zip(models, opts):
        _backward(m, ids)  # the grads exist; build_layout moves them into the arenas
        o.build_layout()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opts[0].step()
        opts[1].step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for _ in range(3):
        for s in scheds:
            s.step()
        graph.replay()
        opts[1].step()
    torch.cuda.synchronize()
    for p, q in zip(keystone_parameters(models[0]), keystone_parameters(models[1])):
        assert torch.equal(bits(p), bits(q))
    opts[0].param_groups[0]["lr"] = 1e-3
    with pytest.raises(RuntimeError, match="every replay would keep this value"):
        opts[0].step()

"""KeystoneAdamW against torch.optim.AdamW, scatter into the frozen weights, resume, clipping, NaN handling."""

import copy
import gc
import math

import pytest
import torch
from conftest import bits, gpu, require_backend, requires_cuda
from tiny import tiny_model

from keystone_kernels import KeystoneAdamW, KeystoneLinear, keystone_parameters, load_adapter, patch, save_adapter
from keystone_kernels.mask import KeystoneMask

# (out, in, rows, cols, bias): prime sizes, empty rows / columns, one row, all rows
LAYERS = [
    (31, 17, [0, 5, 30], [2, 3, 16], True),
    (13, 29, [], [0, 28], False),
    (7, 11, [4], [], True),
    (5, 3, [0, 1, 2, 3, 4], [], False),
]


def _modules(frozen_dtype, gen, device="cpu"):
    out = []
    for n_out, n_in, rows, cols, with_bias in LAYERS:
        w = torch.randn(n_out, n_in, generator=gen)
        b = torch.randn(n_out, generator=gen) if with_bias else None
        out.append(KeystoneLinear(w, b, torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64),
                                  frozen_dtype, "reference").to(device))
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _owned_mask(m):
    owned = torch.zeros(m.out_features, m.in_features, dtype=torch.bool)
    owned[m.rows] = True
    if len(m.cols):
        rows = m.col_rows if m.col_rows is not None else torch.arange(m.out_features)
        owned[rows[:, None], m.cols[None, :]] = True
    return owned


@pytest.mark.parametrize("frozen_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_twenty_steps_match_torch_adamw(any_backend, frozen_dtype, amsgrad, maximize):
    backend, device = any_backend
    gen = torch.Generator().manual_seed(7)
    mods = _modules(frozen_dtype, gen, device)
    before = [m.frozen_weight.clone() for m in mods]
    params = [p for m in mods for p in m.keystone_parameters()]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    # several groups: own lr, weight decay on / off
    split = [params[:2], params[2:4], params[4:]]
    tsplit = [twins[:2], twins[2:4], twins[4:]]
    settings = [dict(lr=3e-3, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.0), dict(lr=5e-4)]
    kw = dict(betas=(0.85, 0.99), eps=1e-7, amsgrad=amsgrad, maximize=maximize)
    opt = KeystoneAdamW([dict(params=g, **s) for g, s in zip(split, settings)], backend=backend, **kw)
    ref = torch.optim.AdamW([dict(params=g, **s) for g, s in zip(tsplit, settings)], foreach=False, **kw)
    for _ in range(20):
        for p, t in zip(params, twins):
            g = torch.randn(p.shape, generator=gen)
            p.grad, t.grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        assert _rel(p.detach().cpu(), t.detach().cpu()) <= 1e-6
    mods = [m.cpu() for m in mods]
    for m, w0 in zip(mods, [w.cpu() for w in before]):
        owned = _owned_mask(m)
        merged, _ = m.merged_weight(torch.float32, masters=True)
        # scattered values are the round-to-nearest-even cast of the fp32 master, bit for bit
        assert torch.equal(bits(m.frozen_weight[owned]), bits(merged[owned].to(frozen_dtype)))
        assert torch.equal(bits(m.frozen_weight[~owned]), bits(w0[~owned]))
        if m.bias_rows is not None:
            assert torch.equal(m.frozen_bias[m.rows], m.bias_rows.detach().to(frozen_dtype))
    assert all(int(s["step"]) == 20 for s in opt.state.values())


def test_empty_group_and_params_without_grad_are_fine(any_backend):
    backend, device = any_backend
    gen = torch.Generator().manual_seed(1)
    mods = _modules(torch.bfloat16, gen, device)
    params = [p for m in mods for p in m.keystone_parameters()]
    opt = KeystoneAdamW([dict(params=params[:1]), dict(params=params[1:])], backend=backend)
    params[0].grad = torch.randn(params[0].shape, generator=gen).to(device)
    snapshot = [p.detach().clone() for p in params]
    opt.step()
    assert not torch.equal(params[0], snapshot[0])
    assert all(torch.equal(p, s) for p, s in zip(params[1:], snapshot[1:]))
    # state is made for every tensor at the first step (the flat arenas); a group with no gradient
    # at all is not stepped, as torch.optim.AdamW skips tensors whose grad is None
    assert [int(opt.state[p]["step"]) for p in params] == [1] + [0] * (len(params) - 1)
    assert all(p.grad is None for p in params[1:])  # as torch.optim leaves them


def test_clipping_matches_clip_grad_norm_then_adamw():
    gen = torch.Generator().manual_seed(3)
    mods = _modules(torch.float32, gen)
    params = [p for m in mods for p in m.keystone_parameters()]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt = KeystoneAdamW(params, lr=1e-2, max_grad_norm=0.5, backend="reference")
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for _ in range(5):
        for p, t in zip(params, twins):
            g = torch.randn(p.shape, generator=gen) * 3
            p.grad, t.grad = g.clone(), g.clone()
        want_norm = torch.nn.utils.clip_grad_norm_(twins, 0.5)
        opt.step()
        ref.step()
        assert opt.last_grad_norm == pytest.approx(float(want_norm), rel=1e-6)
    for p, t in zip(params, twins):
        assert _rel(p.detach(), t.detach()) <= 1e-6


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_gradients_leave_everything_untouched(mode, any_backend):
    backend, device = any_backend
    gen = torch.Generator().manual_seed(4)
    mods = _modules(torch.bfloat16, gen, device)
    params = [p for m in mods for p in m.keystone_parameters()]
    opt = KeystoneAdamW(params, lr=1e-2, nonfinite=mode, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt.step()
    snap = ([p.detach().clone() for p in params], [m.frozen_weight.clone() for m in mods],
            copy.deepcopy(opt.state_dict()))
    params[1].grad[0, 0] = float("nan")
    params[3].grad[-1, -1] = float("inf")
    if mode == "raise":
        with pytest.raises(ValueError, match="non-finite gradient .* the step was not taken"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(p, s) for p, s in zip(params, snap[0]))
    assert all(torch.equal(m.frozen_weight, w) for m, w in zip(mods, snap[1]))
    state = opt.state_dict()["state"]
    for k, v in snap[2]["state"].items():
        assert all(torch.equal(v[name], state[k][name]) for name in v)


def test_scheduler_zero_grad_and_plain_parameters():
    gen = torch.Generator().manual_seed(5)
    mods = _modules(torch.float32, gen)
    norm = torch.nn.Parameter(torch.randn(9, generator=gen))  # e.g. a norm weight a user also trains
    twin = norm.detach().clone().requires_grad_(True)
    opt = KeystoneAdamW([dict(params=mods[0].keystone_parameters()), dict(params=[norm], weight_decay=0.0)], lr=0.1,
                        backend="reference")
    ref = torch.optim.AdamW([twin], lr=0.1, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    for _ in range(4):
        g = torch.randn(9, generator=gen)
        norm.grad, twin.grad = g.clone(), g.clone()
        for p in mods[0].keystone_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    assert _rel(norm.detach(), twin.detach()) <= 1e-6
    opt.zero_grad(set_to_none=True)
    # grads are views of the flat gradient buffer: zeroed in place, not dropped (see KeystoneAdamW)
    for p in [norm, *mods[0].keystone_parameters()]:
        assert p.grad is not None and not bool(p.grad.any())


def _train(model, opt, batches):
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_checkpoint_and_resume_is_bit_exact(tmp_path, any_backend):
    backend, device = any_backend
    base = tiny_model("llama").to(device)
    mask = KeystoneMask({("attn_q", 0, None): [1, 7], ("attn_o", 1, None): [3], ("fwd_up", 1, None): [0, 70],
                         ("fwd_down", 0, None): [5]})
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randint(3, 250, (2, 9), generator=gen).to(device) for _ in range(20)]

    straight = patch(copy.deepcopy(base), mask, backend=backend)
    opt = KeystoneAdamW(keystone_parameters(straight), lr=1e-2, max_grad_norm=1.0, backend=backend)
    _train(straight, opt, batches)

    first = patch(copy.deepcopy(base), mask, backend=backend)
    opt1 = KeystoneAdamW(keystone_parameters(first), lr=1e-2, max_grad_norm=1.0, backend=backend)
    _train(first, opt1, batches[:10])
    save_adapter(first, tmp_path / "adapter.safetensors")
    torch.save(opt1.state_dict(), tmp_path / "optimizer.pt")
    del first, opt1

    resumed = load_adapter(copy.deepcopy(base), tmp_path / "adapter.safetensors", backend=backend)
    opt2 = KeystoneAdamW(keystone_parameters(resumed), lr=1e-2, max_grad_norm=1.0, backend=backend)
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    _train(resumed, opt2, batches[10:])
    for a, b in zip(keystone_parameters(resumed), keystone_parameters(straight)):
        assert torch.equal(a, b)
    for (name, a), b in zip(resumed.named_buffers(), straight.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "invalid learning rate"),
        (dict(betas=(0.9, 1.0)), "invalid betas"),
        (dict(eps=-1e-8), "invalid eps"),
        (dict(weight_decay=-0.1), "invalid weight_decay"),
        (dict(max_grad_norm=0.0), "invalid max_grad_norm"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=message):
        KeystoneAdamW([p], **kwargs)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("group_change,message", [
    (dict(betas=(0.9, 1.0)), r"betas must be in \[0, 1\) and eps >= 0"),
    (dict(betas=(-0.1, 0.999)), r"betas must be in \[0, 1\) and eps >= 0"),
    (dict(eps=-1e-8), r"betas must be in \[0, 1\) and eps >= 0"),
    (dict(lr=float("nan")), "lr nan: lr must be finite and >= 0"),
    (dict(lr=-1e-3), "lr -0.001: lr must be finite and >= 0"),
    (dict(lr=float("inf")), "lr inf: lr must be finite"),
    (dict(weight_decay=-0.1), "weight_decay -0.1: weight_decay must be finite and >= 0"),
])
def test_a_bad_group_set_after_construction_is_refused_at_step(capturable, group_change, message):
    """The fused op takes betas / eps unchecked: a group edited (or added) after __init__ is checked at step,
    and the refused step changes neither weights nor state."""
    gen = torch.Generator().manual_seed(21)
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, lr=1e-2, capturable=capturable)
    _random_grads(params, twins, gen, "cpu")
    opt.step()
    _random_grads(params, twins, gen, "cpu")
    before = [p.detach().clone() for p in params] + [m.frozen_weight.clone() for m in mods]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.param_groups[0].update(group_change)
    with pytest.raises(ValueError, match=message):
        opt.step()
    after = [p.detach() for p in params] + [m.frozen_weight for m in mods]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[name], state[k][name]) for name in s)


def test_non_fp32_parameters_and_sparse_grads_are_refused():
    with pytest.raises(ValueError, match="fp32 master tensors; got a torch.bfloat16"):
        KeystoneAdamW([torch.nn.Parameter(torch.randn(3, 3).bfloat16())])
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = KeystoneAdamW([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


# ---------------------------------------------------------------- flat arenas, capturable mode


def _stepped_pair(backend, device, gen, *, capturable=False, **kw):
    mods = _modules(torch.bfloat16, gen, device)
    params = [p for m in mods for p in m.keystone_parameters()]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt = KeystoneAdamW(params, backend=backend, capturable=capturable, **kw)
    torch_kw = {k: v for k, v in kw.items() if k not in ("max_grad_norm", "nonfinite")}
    ref = torch.optim.AdamW(twins, foreach=False, **torch_kw)
    return mods, params, twins, opt, ref


def _random_grads(params, twins, gen, device):
    for p, t in zip(params, twins):
        g = torch.randn(p.shape, generator=gen)
        p.grad, t.grad = g.to(device), g.clone().to(device)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_matches_torch_adamw(any_backend, amsgrad):
    backend, device = any_backend
    gen = torch.Generator().manual_seed(12)
    mods, params, twins, opt, ref = _stepped_pair(backend, device, gen, capturable=True, lr=3e-3, weight_decay=0.1,
                                                  amsgrad=amsgrad, maximize=True)
    for _ in range(10):
        _random_grads(params, twins, gen, device)
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        assert _rel(p.detach().cpu(), t.detach().cpu()) <= 1e-6
    assert all(s["step"].device.type == torch.device(device).type and int(s["step"]) == 10 for s in opt.state.values())
    m = mods[0]
    assert torch.equal(m.frozen_weight[m.rows], m.weight_rows.detach().bfloat16())


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_capturable_and_default_steps_agree_to_the_last_bit(any_backend, maximize, tensor_lr):
    """Without clipping, the device-side scalars (float64 on the device, rounded once) are the host's, and
    every backend applies them as it applies host scalars."""
    backend, device = any_backend
    runs = []
    for capturable in (False, True):
        gen = torch.Generator().manual_seed(24)
        lr = torch.tensor(2.0**-9, device=device) if tensor_lr and capturable else 2.0**-9  # exact in float32
        mods, params, twins, opt, _ = _stepped_pair(backend, device, gen, capturable=capturable, lr=lr,
                                                    weight_decay=0.1, maximize=maximize, betas=(0.8, 0.95))
        for step in range(7):
            _random_grads(params, twins, gen, device)
            if step == 4:
                opt.param_groups[0]["weight_decay"] = 0.05  # a changed hyperparameter reaches the device
            opt.step()
        runs.append((params, mods, opt))
    (p0, m0, o0), (p1, m1, o1) = runs
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(p0, p1))
    assert all(torch.equal(bits(a.frozen_weight), bits(b.frozen_weight)) for a, b in zip(m0, m1))
    for s0, s1 in zip(o0.state_dict()["state"].values(), o1.state_dict()["state"].values()):
        assert all(torch.equal(bits(s0[n].float().cpu()), bits(s1[n].float().cpu())) for n in s0)


@pytest.mark.parametrize("clip", [0.5, None])
@pytest.mark.parametrize("capturable", [True, False])
def test_a_step_reads_nothing_on_the_host(monkeypatch, capturable, clip):
    """No .item() / float() / int() / bool() / .tolist() of a tensor inside step(). Capturable: CUDA-graph safe.
    Default mode (issue 21): on a GPU a step never waits for the device; the previous step's verdict is read
    from a host buffer."""
    gen = torch.Generator().manual_seed(13)
    lr = torch.tensor(1e-2) if capturable else 1e-2
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, capturable=capturable, lr=lr,
                                                max_grad_norm=clip)
    assert opt.nonfinite == ("skip" if capturable else "defer")
    _random_grads(params, twins, gen, "cpu")
    opt.step()  # the first step builds the layout (allowed to read sizes once)
    reads = []

    def forbidden(name):
        def read(self, *a, **k):
            reads.append(name)
            raise AssertionError(f"step() called Tensor.{name}")
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    for _ in range(3):
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen))
        opt.step()
    monkeypatch.undo()
    assert reads == [] and opt.skipped_steps == 0
    norm = opt.last_grad_norm
    assert (norm.dim() == 0) if capturable else (isinstance(norm, float) and norm > 0)


def test_capturable_skips_nonfinite_steps_on_the_device(any_backend):
    backend, device = any_backend
    gen = torch.Generator().manual_seed(14)
    mods, params, twins, opt, _ = _stepped_pair(backend, device, gen, capturable=True, lr=1e-2, max_grad_norm=1.0)
    _random_grads(params, twins, gen, device)
    opt.step()
    snap = [p.detach().clone() for p in params], [m.frozen_weight.clone() for m in mods]
    state = copy.deepcopy(opt.state_dict()["state"])
    params[2].grad.view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and int(opt.skipped_steps_tensor) == 1
    assert all(torch.equal(bits(p), bits(s)) for p, s in zip(params, snap[0]))
    assert all(torch.equal(bits(m.frozen_weight), bits(w)) for m, w in zip(mods, snap[1]))
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(bits(v[n]), bits(state[k][n])) for n in v)


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_capturable_step_replays_in_a_cuda_graph(backend):
    """The claim of capturable=True: step() captured once in a CUDA graph, then replayed with new
    gradients, gives what eager capturable steps give, bit for bit, a skipped non-finite step included."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(22)
    kw = dict(capturable=True, lr=torch.tensor(3e-3, device="cuda"), weight_decay=0.1, max_grad_norm=1.0)
    graphed, params, _, opt, _ = _stepped_pair(backend, "cuda", torch.Generator().manual_seed(23), **kw)
    eager, eparams, _, eopt, _ = _stepped_pair(backend, "cuda", torch.Generator().manual_seed(23), **kw)
    grads = [[torch.randn(p.shape, generator=gen).cuda() for p in params] for _ in range(6)]
    grads[4][1].view(-1)[0] = float("nan")  # the fifth replay is skipped on the device

    def set_grads(ps, gs):
        for p, g in zip(ps, gs):
            if p.grad is None:  # before the first step
                p.grad = g.clone()
            else:  # in place: after the first step .grad is the optimizer's arena view
                p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
        for o, ps in ((opt, params), (eopt, eparams)):
            for _ in range(2):
                set_grads(ps, grads[0])
                o.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # the gradients are the arena views now: static memory the replays refill
    for gs in grads[1:]:
        set_grads(params, gs)
        graph.replay()
        set_grads(eparams, gs)
        eopt.step()
    torch.cuda.synchronize()
    assert int(opt.skipped_steps_tensor) == int(eopt.skipped_steps_tensor) == 1
    assert all(torch.equal(bits(p), bits(e)) for p, e in zip(params, eparams))
    assert all(torch.equal(bits(m.frozen_weight), bits(e.frozen_weight)) for m, e in zip(graphed, eager))
    for v, ev in zip(opt.state_dict()["state"].values(), eopt.state_dict()["state"].values()):
        assert all(torch.equal(bits(v[n]), bits(ev[n])) for n in v)


def test_capturable_refuses_nonfinite_raise():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="nonfinite='raise' needs the host .* capturable=True"):
        KeystoneAdamW([p], capturable=True, nonfinite="raise")
    assert KeystoneAdamW([p], capturable=True).nonfinite == "skip"


def test_params_grads_and_state_are_views_of_flat_arenas():
    gen = torch.Generator().manual_seed(15)
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, lr=1e-2)
    _random_grads(params, twins, gen, "cpu")
    opt.step()
    (bucket,) = opt._buckets
    for p in params:
        for t in (p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
            assert t.untyped_storage().data_ptr() in {a.untyped_storage().data_ptr() for a in
                                                       (bucket.master, bucket.grad, bucket.exp_avg, bucket.exp_avg_sq)}
    assert len({id(opt.state[p]["step"]) for p in params}) == 1  # one step count per group


def test_steady_state_step_has_no_per_tensor_host_work(monkeypatch):
    """After the first step: no layout rebuild, no per-tensor target lookup, one fused op per group."""
    from keystone_kernels.optim import adamw as optim

    gen = torch.Generator().manual_seed(16)
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, lr=1e-2)
    _random_grads(params, twins, gen, "cpu")
    opt.step()
    lookups, calls = [], []
    monkeypatch.setattr(optim, "_scatter_target", lambda p: lookups.append(p))
    real = optim.fused_adamw_scatter_unchecked
    monkeypatch.setattr(optim, "fused_adamw_scatter_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        for p in params:  # in place, as backward accumulates into the views
            p.grad.add_(torch.randn(p.shape, generator=gen))
        opt.step()
    assert lookups == [] and len(calls) == 3


def test_layout_rebuilds_after_moves_groups_and_state_loads():
    """add_param_group, load_state_dict and module.to() rebuild the layout; the math stays torch's."""
    gen = torch.Generator().manual_seed(17)
    mods, params, twins, opt, ref = _stepped_pair("reference", "cpu", gen, lr=1e-2, weight_decay=0.05)
    first, later = params[:3], params[3:]
    opt = KeystoneAdamW(first, lr=1e-2, weight_decay=0.05, backend="reference")
    ref = torch.optim.AdamW(twins[:3], lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(6):
        if step == 2:
            opt.add_param_group(dict(params=later))
            ref.add_param_group(dict(params=twins[3:]))
        if step == 3:
            fresh = KeystoneAdamW([dict(params=first), dict(params=later)], lr=1e-2, weight_decay=0.05,
                                  backend="reference")
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = fresh
        if step == 4:
            for m in mods:
                m.to("cpu")  # _apply: tensors may have moved
        _random_grads(params, twins, gen, "cpu")
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        assert _rel(p.detach(), t.detach()) <= 1e-6
    for m in mods:
        if m.weight_rows is not None:
            assert torch.equal(m.frozen_weight[m.rows], m.weight_rows.detach().bfloat16())


def test_stepping_a_merged_model_raises():
    from keystone_kernels import merge

    model = patch(tiny_model("llama"), KeystoneMask({("attn_q", 0, None): [1, 7]}), backend="reference")
    opt = KeystoneAdamW(keystone_parameters(model), backend="reference")
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    opt.step()
    merge(model)
    with pytest.raises(ValueError, match="belongs to a KeystoneLinear that was (merged|freed)"):
        opt.step()


def test_backward_accumulates_into_the_gradient_arena():
    """Two micro-batches: grads land in the arena views (no copy), summed like torch's accumulation."""
    model = patch(tiny_model("llama"), KeystoneMask({("fwd_up", 0, None): [2, 9], ("attn_o", 1, None): [3]}),
                  backend="reference")
    params = keystone_parameters(model)
    opt = KeystoneAdamW(params, lr=1e-2, backend="reference")
    ids = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 3, 4, 11]])]
    model(input_ids=ids[0], labels=ids[0]).loss.backward()
    opt.step()
    views = [p.grad for p in params]
    opt.zero_grad()
    want = None
    for x in ids:
        model(input_ids=x, labels=x).loss.backward()
        grads = [torch.autograd.grad(model(input_ids=x, labels=x).loss, params)]
        want = grads[0] if want is None else [a + b for a, b in zip(want, grads[0])]
    assert all(p.grad is v for p, v in zip(params, views))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------- torch.optim's rules
def _assert_same_as_torch(opt, ref, params, twins):
    for p, t in zip(params, twins):
        assert _rel(p.detach().cpu(), t.detach().cpu()) <= 1e-6
        if ref.state.get(t):
            assert int(opt.state[p]["step"]) == int(ref.state[t]["step"])
            assert _rel(opt.state[p]["exp_avg"].cpu(), ref.state[t]["exp_avg"].cpu()) <= 1e-6
        else:  # torch has no state for a tensor it never stepped; ours is an untouched zero state
            assert int(opt.state[p]["step"]) == 0 and not bool(opt.state[p]["exp_avg"].any())


@pytest.mark.parametrize("capturable", [False, True])
def test_a_step_after_zero_grad_without_backward_changes_nothing(any_backend, capturable):
    """zero_grad(set_to_none=True) then step(): torch's AdamW steps nothing (no grad); neither do we."""
    backend, device = any_backend
    gc.collect()  # a KeystoneLinear of an earlier test freed mid-test would rebuild the layout (grads dropped)
    gen = torch.Generator().manual_seed(31)
    mods, params, twins, opt, ref = _stepped_pair(backend, device, gen, lr=1e-2, capturable=capturable)
    _random_grads(params, twins, gen, device)
    opt.step()
    ref.step()
    for o in (opt, ref):
        o.zero_grad(set_to_none=True)
    frozen = [m.frozen_weight.clone() for m in mods]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step()
    ref.step()
    _assert_same_as_torch(opt, ref, params, twins)
    assert all(torch.equal(m.frozen_weight, w) for m, w in zip(mods, frozen))
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(v[name], state[k][name]) for name in v)
    for _ in range(2):  # and training goes on as torch's does
        opt.zero_grad(set_to_none=True)
        for p, t in zip(params, twins):  # in place into the zeroed views, as backward accumulates
            g = torch.randn(p.shape, generator=gen)
            if p.grad is None:  # zero_grad after a layout change (any KeystoneLinear freed) drops the views
                p.grad = g.to(device)
            else:
                p.grad.add_(g.to(device))
            t.grad = g.clone().to(device)
        opt.step()
        ref.step()
        _assert_same_as_torch(opt, ref, params, twins)


@pytest.mark.parametrize("capturable", [False, True])
def test_tensors_whose_grad_is_none_are_not_stepped_as_in_torch(any_backend, capturable):
    """A pattern of None grads over 8 steps: per-tensor step counts, moments and values equal torch's AdamW."""
    backend, device = any_backend
    gen = torch.Generator().manual_seed(32)
    mods, params, twins, opt, ref = _stepped_pair(backend, device, gen, lr=1e-2, weight_decay=0.1,
                                                  capturable=capturable)
    n = len(params)
    for step in range(8):
        for k, (p, t) in enumerate(zip(params, twins)):
            if (k + step) % 3 == 0 and step != 4:  # step 4: every tensor has a gradient
                p.grad = t.grad = None
            else:
                g = torch.randn(p.shape, generator=gen)
                p.grad, t.grad = g.to(device), g.clone().to(device)
        opt.step()
        ref.step()
        _assert_same_as_torch(opt, ref, params, twins)
    counts = sorted({int(opt.state[p]["step"]) for p in params})
    assert len(counts) > 1 and len(opt._buckets) >= len(counts)  # one bucket per step count
    for m in mods:  # and the frozen copies follow
        if m.weight_rows is not None:
            assert torch.equal(m.frozen_weight[m.rows].cpu(), m.weight_rows.detach().bfloat16().cpu())
    assert n == len(params)


def test_a_state_with_different_step_counts_loads_and_continues_as_torch():
    gen = torch.Generator().manual_seed(33)
    mods, params, twins, opt, ref = _stepped_pair("reference", "cpu", gen, lr=1e-2)
    for step in range(3):
        _random_grads(params, twins, gen, "cpu")
        if step == 1:
            params[0].grad = twins[0].grad = None
        opt.step()
        ref.step()
    fresh = KeystoneAdamW(params, lr=1e-2, backend="reference")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        _random_grads(params, twins, gen, "cpu")
        fresh.step()
        ref.step()
    _assert_same_as_torch(fresh, ref, params, twins)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_finite_gradients_whose_norm_overflows_are_refused_like_nonfinite_ones(mode):
    """Gradients of 3e19 are finite, their fp32 norm is inf: the step is not taken, nothing changes."""
    gen = torch.Generator().manual_seed(34)
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, lr=1e-2, nonfinite=mode,
                                                max_grad_norm=1.0)
    _random_grads(params, twins, gen, "cpu")
    opt.step()
    before = [p.detach().clone() for p in params] + [m.frozen_weight.clone() for m in mods]
    state = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.full(p.shape, 3e19)
    assert all(bool(torch.isfinite(p.grad).all()) for p in params)
    if mode == "raise":
        with pytest.raises(ValueError, match="norm is inf although every gradient is finite.*not taken"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    after = [p.detach() for p in params] + [m.frozen_weight for m in mods]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(v[name], state[k][name]) for name in v)


def test_capturable_skips_a_step_whose_norm_overflows():
    gen = torch.Generator().manual_seed(35)
    mods, params, twins, opt, _ = _stepped_pair("reference", "cpu", gen, lr=1e-2, capturable=True)
    _random_grads(params, twins, gen, "cpu")
    opt.step()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full(p.shape, 3e19)
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, b) for p, b in zip(params, before))


def _three_modes(backend, device, gen, **kw):
    """The same modules and gradients stepped by KeystoneAdamW in each nonfinite mode (defer is the default)."""
    out = {}
    for mode in ("defer", "raise", "skip"):
        mods = _modules(torch.bfloat16, torch.Generator().manual_seed(21), device)
        params = [p for m in mods for p in m.keystone_parameters()]
        out[mode] = mods, params, KeystoneAdamW(params, backend=backend, nonfinite=mode, **kw)
    assert KeystoneAdamW([torch.nn.Parameter(torch.ones(2))]).nonfinite == "defer"
    return out


def _grads(params, gen, device, bad=False):
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if bad:
        grads[1][0, 0] = float("nan")
    for p, g in zip(params, grads):
        p.grad = g.to(device)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_default_step_equals_the_raising_one_bit_for_bit_and_reports_a_skip_one_step_late(any_backend, clip):
    """defer (the default) decides on the device and reads the verdict at the next step(): the same weights,
    state and counts as "raise" (one host sync per step) and "skip", bit for bit, a skipped step included."""
    backend, device = any_backend
    modes = _three_modes(backend, device, None, lr=1e-2, weight_decay=0.1, max_grad_norm=clip)
    for i, bad in enumerate([False, False, True, False, False]):
        for mode, (_, params, opt) in modes.items():
            _grads(params, torch.Generator().manual_seed(100 + i), device, bad)
            if mode == "raise" and bad:
                with pytest.raises(ValueError, match="non-finite gradient"):
                    opt.step()
            elif mode == "defer" and i == 3:  # the step after the skipped one: its verdict, raised; nothing taken
                with pytest.raises(ValueError, match="last step's gradients were not finite.* this step was not"):
                    opt.step()
                opt.step()  # the same gradients again: now taken
            else:
                opt.step()
    (m0, p0, o0), (m1, p1, o1), (m2, p2, o2) = modes.values()
    for ps in (p1, p2):
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(p0, ps))
    for ms in (m1, m2):
        assert all(torch.equal(bits(a.frozen_weight), bits(b.frozen_weight)) for a, b in zip(m0, ms))
    states = [o.state_dict()["state"] for o in (o0, o1, o2)]
    for s0, s in ((states[0], states[1]), (states[0], states[2])):
        for k in s0:
            assert all(torch.equal(bits(s0[k][n].float().cpu()), bits(s[k][n].float().cpu())) for n in s0[k])
    assert all(int(v["step"]) == 4 for v in states[0].values())
    assert o0.last_grad_norm == o1.last_grad_norm and isinstance(o0.last_grad_norm, float)
    assert o2.skipped_steps == 1 and o0.skipped_steps == 1


def test_a_skipped_deferred_step_is_taken_back_before_state_dict_reads_the_counts():
    modes = _three_modes("reference", "cpu", None, lr=1e-2)
    _, params, opt = modes["defer"]
    _grads(params, torch.Generator().manual_seed(1), "cpu")
    opt.step()
    snap = [p.detach().clone() for p in params]
    _grads(params, torch.Generator().manual_seed(2), "cpu", bad=True)
    opt.step()  # no error yet: the verdict is read later
    assert all(int(v["step"]) == 1 for v in opt.state_dict()["state"].values())  # settled: the skip taken back
    assert all(torch.equal(p, s) for p, s in zip(params, snap))
    assert math.isnan(opt.last_grad_norm)
    with pytest.raises(ValueError, match="not finite"):
        opt.step()


def test_the_default_step_adds_few_device_ops_to_the_raising_one():
    """Each device op is a launch on a GPU (docs/design.md section 6): without clipping the sync-free step
    replaces the raising step's two host reads with its norm test and verdict (sub, isnan, cat, stack)."""
    from keystone_kernels.utils.profiling import count_device_ops

    counts = {}
    for mode, (_, params, opt) in _three_modes("ext", "cpu", None, lr=1e-2).items():
        _grads(params, torch.Generator().manual_seed(7), "cpu")
        opt.step()  # builds the layout
        counts[mode] = count_device_ops(opt.step)
    assert "aten._local_scalar_dense" in counts["raise"] and "aten._local_scalar_dense" not in counts["defer"]
    extra = counts["defer"] - counts["raise"]
    assert set(extra) <= {"aten.sub", "aten.isnan", "aten.cat", "aten.stack"}, extra
    assert sum(counts["defer"].values()) <= sum(counts["raise"].values()) + 2

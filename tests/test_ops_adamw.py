"""fused_adamw_scatter: the reference against torch.optim.AdamW, every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import bits, complement, gpu, make_index, poison, require_backend, requires_cuda

from keystone_kernels import ops
from keystone_kernels.ops.layout import ALIGN, BLOCK, Target, build_flat_layout, host_scalars

# A linear layer: (out, in, weight dtype, rows kind, cols kind, transposed storage).
MIXED = [
    (37, 53, torch.bfloat16, "random", "random", False),
    (41, 19, torch.float16, "one", "explicit_all", True),  # GPT-2 Conv1D style [in, out] storage
    (23, 29, torch.float32, "empty", "first_last", False),
]
LAYOUTS = {
    "mixed": MIXED,
    "rows_only": [(37, 53, torch.bfloat16, "random", "empty", False)],
    "cols_only": [(37, 53, torch.bfloat16, "empty", "random", False)],
    "all_rows": [(13, 7, torch.bfloat16, "explicit_all", "random", False)],  # column tensor is [0, m]
    # several blocks per tensor, the last one partial: 97 x 61 = 5917 elements, BLOCK = 2048
    "multi_block": [(97, 61, torch.bfloat16, "explicit_all", "empty", False),
                    (61, 97, torch.float16, "empty", "explicit_all", True)],
}
# (amsgrad, maximize, grad_scale, beta1): beta1 = 0.3 takes lerp's other formula (weight >= 0.5).
FLAGS = {
    "plain": (False, False, 1.0, 0.9),
    "amsgrad": (True, False, 1.0, 0.9),
    "maximize_scaled": (False, True, 0.37, 0.9),
    "lerp_large_weight": (True, False, 1.0, 0.3),
}
GROUP_SETTINGS = [(1e-2, 0.1), (3e-3, 0.0)]  # (lr, weight_decay) of the row group and the column group
ARENAS = ("master", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Keystone:
    """The keystone tensors of some linear layers: each row set R owns W[R, :], each column set C
    owns W[notR][:, C]. Row tensors form one param group, column tensors another (own lr / wd), each
    with its flat layout and fp32 arenas (master, optimizer state) scattering into the frozen weights."""

    def __init__(self, specs, gen: torch.Generator, device="cpu", untargeted: int = 0):
        self.weights, self.tensors = [], []  # tensors: (group, owner weight, rows, cols, initial values)
        for out, inp, dtype, rows_kind, cols_kind, transposed in specs:
            w = torch.randn(inp, out, generator=gen).t() if transposed else torch.randn(out, inp, generator=gen)
            w = w.to(dtype).to(device)
            R, C = make_index(rows_kind, out, gen), make_index(cols_kind, inp, gen)
            self.weights.append(w)
            if R.numel():
                self._add(0, len(self.weights) - 1, R, None)
            if C.numel():
                self._add(1, len(self.weights) - 1, complement(R, out), C)  # None when R is empty: all rows
        for _ in range(untargeted):  # a tensor with no frozen target (a norm the user trains)
            self.tensors.append((0, None, None, None, torch.randn(1, 19, generator=gen).to(device)))
        self.weights_before = [w.clone() for w in self.weights]
        self.groups = []
        for group in (0, 1):
            members = [t for t in self.tensors if t[0] == group]
            shapes = [tuple(t[4].shape) for t in members]
            targets = [None if o is None else Target(self.weights[o], r, c) for _, o, r, c, _ in members]
            layout = build_flat_layout(shapes, targets, torch.device(device))
            arenas = {name: torch.zeros(layout.numel, device=device) for name in ARENAS}
            for k, t in enumerate(members):
                layout.view(arenas["master"], k).copy_(t[4])
            self.groups.append((layout, arenas, members))

    def _add(self, group, owner, rows, cols):
        w = self.weights[owner]
        rows = None if rows is None else rows.to(w.device)
        cols = None if cols is None else cols.to(w.device)
        sub = w if rows is None else w[rows]
        sub = sub if cols is None else sub[:, cols]
        self.tensors.append((group, owner, rows, cols, sub.float().contiguous()))

    def views(self, name: str) -> list[torch.Tensor]:
        """Every tensor's [n, m] view of one arena, group by group."""
        return [layout.view(arenas[name], k) for layout, arenas, members in self.groups for k in range(len(members))]

    def keystone_mask(self, owner, rows, cols) -> torch.Tensor:
        """Boolean [out, in]: where a tensor lives in its weight."""
        w = self.weights[owner]
        mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        r = torch.arange(w.shape[0], device=w.device) if rows is None else rows
        c = torch.arange(w.shape[1], device=w.device) if cols is None else cols
        mask[r[:, None], c[None, :]] = True
        return mask

    def poison_keystone_elements(self):
        for _, owner, rows, cols, _ in self.tensors:
            if owner is not None:
                w = self.weights[owner]
                w[self.keystone_mask(owner, rows, cols)] = poison(torch.empty(1, dtype=w.dtype, device=w.device))

    def step(self, gen, step, *, amsgrad, maximize, grad_scale, beta1, backend, device_scalars=False, skip=False):
        """One step of both groups with fresh random gradients (returned, group by group)."""
        grads = []
        for group, (layout, arenas, members) in enumerate(self.groups):
            for k in range(len(members)):
                g = torch.randn(layout.shapes[k], generator=gen)
                layout.view(arenas["grad"], k).copy_(g)
                grads.append(g)
            lr, wd = GROUP_SETTINGS[group]
            scalars = host_scalars(lr, wd, step, beta1, 0.999, maximize, grad_scale)
            if device_scalars:
                scalars = torch.tensor([*scalars, float(skip)], dtype=torch.float32, device=layout.device)
            ops.fused_adamw_scatter(layout, arenas["master"], arenas["grad"], arenas["exp_avg"], arenas["exp_avg_sq"],
                                    arenas["max_exp_avg_sq"] if amsgrad else None, scalars=scalars, beta1=beta1,
                                    beta2=0.999, eps=1e-8, backend=backend)
        return grads

    def assert_weights_hold_params(self):
        """Keystone elements == rne(fp32 master), bit for bit; every other element untouched."""
        covered = [torch.zeros(w.shape, dtype=torch.bool, device=w.device) for w in self.weights]
        ordered = [t for g in (0, 1) for t in self.tensors if t[0] == g]
        for (_, owner, rows, cols, _), p in zip(ordered, self.views("master")):
            if owner is None:
                continue
            w = self.weights[owner]
            mask = self.keystone_mask(owner, rows, cols)
            covered[owner] |= mask
            got = w[mask].view(p.shape) if p.numel() else w[mask]
            assert torch.equal(bits(got), bits(p.to(w.dtype).view(got.shape))), "a tensor was not scattered"
        for w, before, cov in zip(self.weights, self.weights_before, covered):
            assert torch.equal(bits(w[~cov]), bits(before[~cov])), "a non-keystone weight element changed"


def _close(a, b):
    # The kernels take IEEE sqrt, torch's vectorised CPU sqrt is within an ulp: a few ulps of
    # difference after 20 steps on O(1) values. A wrong formula is off by ~lr = 1e-3 or more.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _assert_same_state(got: Keystone, ref: Keystone, amsgrad: bool):
    names = ARENAS if amsgrad else ARENAS[:-1]
    for name in names:
        views = got.views(name)
        assert len(views) == len(ref.views(name)) > 0
        for a, b in zip(views, ref.views(name)):
            _close(a, b)


@pytest.mark.parametrize("flags", list(FLAGS), ids=str)
def test_reference_matches_torch_adamw(flags, rng):
    amsgrad, maximize, grad_scale, beta1 = FLAGS[flags]
    ks = Keystone(MIXED, rng, untargeted=1)
    masters = [torch.nn.Parameter(p.clone()) for p in ks.views("master")]
    sizes = [len(members) for _, _, members in ks.groups]
    groups = [{"params": masters[:sizes[0]], "lr": GROUP_SETTINGS[0][0], "weight_decay": GROUP_SETTINGS[0][1]},
              {"params": masters[sizes[0]:], "lr": GROUP_SETTINGS[1][0], "weight_decay": GROUP_SETTINGS[1][1]}]
    opt = torch.optim.AdamW(groups, betas=(beta1, 0.999), eps=1e-8, amsgrad=amsgrad, maximize=maximize,
                            foreach=False)
    for step in range(1, 21):
        grads = ks.step(rng, step, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, beta1=beta1,
                        backend="reference")
        for master, g in zip(masters, grads):
            master.grad = g * grad_scale
        opt.step()
    for k, master in enumerate(masters):
        state = opt.state[master]
        _close(ks.views("master")[k], master.detach())
        _close(ks.views("exp_avg")[k], state["exp_avg"])
        _close(ks.views("exp_avg_sq")[k], state["exp_avg_sq"])
        if amsgrad:
            _close(ks.views("max_exp_avg_sq")[k], state["max_exp_avg_sq"])
    ks.assert_weights_hold_params()


@pytest.mark.parametrize("flags", list(FLAGS), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
def test_backend_matches_reference(kernel_backend, layout, flags):
    name, device = kernel_backend
    amsgrad, maximize, grad_scale, beta1 = FLAGS[flags]
    runs = {}
    for backend in ("reference", name):
        gen = torch.Generator().manual_seed(11)  # same weights, indices and gradients for both
        ks = Keystone(LAYOUTS[layout], gen, device, untargeted=1)
        ks.poison_keystone_elements()  # an element the kernel never scatters stays NaN
        for step in range(1, 6):
            ks.step(gen, step, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, beta1=beta1,
                    backend=backend)
        ks.assert_weights_hold_params()
        runs[backend] = ks
    _assert_same_state(runs[name], runs["reference"], amsgrad)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_device_scalars_match_host_scalars(any_backend, amsgrad):
    """The capturable form (scalars in a device tensor) computes exactly what the host form does."""
    name, device = any_backend
    runs = []
    for device_scalars in (False, True):
        gen = torch.Generator().manual_seed(3)
        ks = Keystone(MIXED, gen, device, untargeted=1)
        for step in range(1, 4):
            ks.step(gen, step, amsgrad=amsgrad, maximize=True, grad_scale=0.5, beta1=0.9, backend=name,
                    device_scalars=device_scalars)
        ks.assert_weights_hold_params()
        runs.append(ks)
    _assert_same_state(runs[1], runs[0], amsgrad)


def test_skip_changes_nothing(any_backend):
    """skip = 1 in the device scalars: arenas and frozen weights stay bit-identical."""
    name, device = any_backend
    gen = torch.Generator().manual_seed(8)
    ks = Keystone(MIXED, gen, device, untargeted=1)
    ks.step(gen, 1, amsgrad=True, maximize=False, grad_scale=1.0, beta1=0.9, backend=name)
    before = {n: [v.clone() for v in ks.views(n)] for n in ARENAS if n != "grad"}
    weights = [w.clone() for w in ks.weights]
    ks.step(gen, 2, amsgrad=True, maximize=False, grad_scale=1.0, beta1=0.9, backend=name, device_scalars=True,
            skip=True)
    for n, views in before.items():
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ks.views(n), views)), f"{n} changed"
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ks.weights, weights)), "a frozen weight changed"


def test_layout_places_tensors_aligned_and_disjoint(rng):
    ks = Keystone(MIXED + LAYOUTS["multi_block"], rng, untargeted=2)
    for layout, _, _ in ks.groups:
        ends = [o + n * m for o, (n, m) in zip(layout.offsets, layout.shapes)]
        assert all(o % ALIGN == 0 for o in layout.offsets)
        assert all(e <= o for e, o in zip(ends, layout.offsets[1:])) and ends[-1] <= layout.numel
        blocks = layout.blocks.tolist()
        # every element of every tensor in exactly one block
        expected = sorted((k, s) for k, (n, m) in enumerate(layout.shapes) for s in range(0, n * m, BLOCK))
        assert sorted(map(tuple, blocks)) == expected
        for code, (first, end) in layout.dtype_ranges.items():
            assert {int(layout.segments[b[0], 8]) for b in blocks[first:end]} == {code}


def test_triton_launches_once_per_weight_dtype(monkeypatch, rng):
    require_backend("triton", "cpu")
    from keystone_kernels.ops.triton import adamw

    launches = []
    kernel = adamw._fused_adamw_scatter_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(adamw, "_fused_adamw_scatter_kernel", Counting())
    ks = Keystone(MIXED + [(17, 11, torch.bfloat16, "one", "one", False)], rng, untargeted=1)
    ks.step(rng, 1, amsgrad=False, maximize=False, grad_scale=1.0, beta1=0.9, backend="triton")
    ks.assert_weights_hold_params()
    # per group: one launch per weight dtype of its tensors, one for the untargeted tensor
    expected = sum(len({int(c) for c in layout.segments[:, 8].tolist()}) for layout, _, _ in ks.groups)
    assert len(ks.tensors) >= 7 and len(launches) == expected >= 4


# ---------------------------------------------------------------- argument checks


def _valid_call(gen):
    w = torch.randn(6, 5, generator=gen).bfloat16()
    rows = torch.tensor([1, 4])
    layout = build_flat_layout([(2, 5)], [Target(w, rows, None)], torch.device("cpu"))
    arenas = {name: torch.randn(layout.numel, generator=gen) for name in ARENAS[:4]}
    return layout, arenas, w


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(grad=torch.zeros(3)), r"grad must be a 1-D float32 arena of 16 elements, got torch.float32 \(3,\)"),
        (dict(exp_avg=torch.zeros(16, dtype=torch.float64)), "exp_avg must be a 1-D float32 arena"),
        (dict(master=torch.zeros(32)[::2]), "master must be contiguous"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(scalars=(1.0, 2.0)), "scalars must be"),
        (dict(scalars=torch.zeros(4)), r"scalars must be a float32 tensor of shape \(5,\)"),
    ],
)
def test_errors_name_the_argument(change, message, rng):
    layout, arenas, w = _valid_call(rng)
    kwargs = dict(arenas, scalars=host_scalars(1e-3, 0.0, 1, 0.9, 0.999), beta1=0.9) | change
    before = [t.clone() for t in (*arenas.values(), w)]
    with pytest.raises(ValueError, match=message):
        ops.fused_adamw_scatter(layout, **kwargs)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(before, (*arenas.values(), w))), "a rejected call wrote"


@pytest.mark.parametrize(
    "target,shape,message",
    [
        (lambda w: Target(w, torch.tensor([4, 1]), None), (2, 5), r"rows\[0\] must be sorted and unique"),
        (lambda w: Target(w, torch.tensor([1, 6]), None), (2, 5), r"rows\[0\] holds 6, out of range \[0, 6\)"),
        (lambda w: Target(w, torch.tensor([1, 4]), torch.tensor([0, 1])), (2, 5),
         r"tensor\[0\] must have shape \(2, 2\)"),
        (lambda w: Target(w.flatten(), None, None), (30, 1), r"weight\[0\] must be 2-D"),
    ],
)
def test_layout_rejects_bad_targets(target, shape, message, rng):
    w = torch.randn(6, 5, generator=rng).bfloat16()
    with pytest.raises(ValueError, match=message):
        build_flat_layout([shape], [target(w)], torch.device("cpu"))


def test_host_scalars_are_torchs_formulas():
    lr, wd, step, b1, b2 = 3e-3, 0.1, 7, 0.85, 0.99
    assert host_scalars(lr, wd, step, b1, b2, maximize=True, grad_scale=0.5) == (
        1 - lr * wd, lr / (1 - b1**step), (1 - b2**step) ** 0.5, -0.5)
    with pytest.raises(ValueError, match="step must be a whole number >= 1"):
        host_scalars(lr, wd, 0, b1, b2)


def test_empty_layout_is_a_no_op(any_backend):
    name, device = any_backend
    layout = build_flat_layout([], [], torch.device(device))
    arenas = [torch.zeros(0, device=device) for _ in range(4)]
    ops.fused_adamw_scatter(layout, *arenas, scalars=host_scalars(1e-3, 0.0, 1, 0.9, 0.999), backend=name)
    assert layout.numel == 0 and layout.blocks.shape == (0, 2)


# ---------------------------------------------------------------- torch.library integration


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("device_scalars", [False, True])
def test_ext_opcheck(device, amsgrad, device_scalars):
    require_backend("ext", device)
    gen = torch.Generator().manual_seed(4)
    ks = Keystone(MIXED, gen, device)
    layout, arenas, _ = ks.groups[0]
    arenas["grad"].copy_(torch.randn(layout.numel, generator=gen))
    scalars = torch.tensor([0.999, 1e-3, 0.1, 1.0, 0.0], device=device) if device_scalars else None
    args = (arenas["master"], arenas["grad"], arenas["exp_avg"], arenas["exp_avg_sq"],
            arenas["max_exp_avg_sq"] if amsgrad else None, layout.weights, layout.segments, layout.index,
            layout.blocks, scalars, BLOCK, 0.999, 1e-3, 0.1, 1.0, 0.9, 0.999, 1e-8)
    torch.library.opcheck(torch.ops.keystone.fused_adamw_scatter.default, args)


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_large_cuda(backend):
    """Many tensors, ~1.5 M elements, three weight dtypes: several blocks per tensor, one launch per dtype."""
    require_backend(backend, "cuda")
    specs = [(576, 1536, dtype, "random", "random", False) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    specs += [(1536, 576, torch.bfloat16, "one", "random", True)]
    runs = {}
    for name in ("reference", backend):
        gen = torch.Generator().manual_seed(21)
        ks = Keystone(specs, gen, "cuda")
        ks.poison_keystone_elements()
        for step in range(1, 6):
            ks.step(gen, step, amsgrad=True, maximize=False, grad_scale=1.0, beta1=0.9, backend=name)
        ks.assert_weights_hold_params()
        runs[name] = ks
    _assert_same_state(runs[backend], runs["reference"], amsgrad=True)

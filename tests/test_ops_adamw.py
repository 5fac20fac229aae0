"""fused_adamw_scatter: the reference against torch.optim.AdamW, every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import bits, complement, gpu, make_index, poison, require_backend, requires_cuda

from keystone_kernels import ops
from keystone_kernels.ops import reference

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
}
# (amsgrad, maximize, grad_scale, beta1): beta1 = 0.3 takes lerp's other formula (weight >= 0.5).
FLAGS = {
    "plain": (False, False, 1.0, 0.9),
    "amsgrad": (True, False, 1.0, 0.9),
    "maximize_scaled": (False, True, 0.37, 0.9),
    "lerp_large_weight": (True, False, 1.0, 0.3),
}
ROW_LR, ROW_WD, COL_LR, COL_WD = 1e-2, 0.1, 3e-3, 0.0  # two param groups


class Keystone:
    """The keystone tensors of some linear layers: each row set R owns W[R, :], each column set C
    owns W[notR][:, C]; fp32 masters, optimizer state and the frozen weights they scatter into."""

    def __init__(self, specs, gen: torch.Generator, device="cpu"):
        self.weights, self.params, self.rows, self.cols, self.lrs, self.wds = [], [], [], [], [], []
        self.owner = []  # index into weights of each tensor
        for out, inp, dtype, rows_kind, cols_kind, transposed in specs:
            w = torch.randn(inp, out, generator=gen).t() if transposed else torch.randn(out, inp, generator=gen)
            w = w.to(dtype).to(device)
            R, C = make_index(rows_kind, out, gen), make_index(cols_kind, inp, gen)
            self.weights.append(w)
            if R.numel():
                self._add(len(self.weights) - 1, R, None, ROW_LR, ROW_WD)
            if C.numel():
                not_r = complement(R, out)  # None when R is empty: all rows
                self._add(len(self.weights) - 1, not_r, C, COL_LR, COL_WD)
        self.weights_before = [w.clone() for w in self.weights]
        zeros = lambda: [torch.zeros_like(p) for p in self.params]  # noqa: E731
        self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs = zeros(), zeros(), zeros()

    def _add(self, owner, rows, cols, lr, wd):
        w = self.weights[owner]
        rows = None if rows is None else rows.to(w.device)
        cols = None if cols is None else cols.to(w.device)
        sub = w if rows is None else w[rows]
        sub = sub if cols is None else sub[:, cols]
        self.params.append(sub.float().contiguous())
        self.rows.append(rows)
        self.cols.append(cols)
        self.lrs.append(lr)
        self.wds.append(wd)
        self.owner.append(owner)

    def keystone_mask(self, k: int) -> torch.Tensor:
        """Boolean [out, in]: where tensor k lives in its weight."""
        w = self.weights[self.owner[k]]
        mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        r = torch.arange(w.shape[0], device=w.device) if self.rows[k] is None else self.rows[k]
        c = torch.arange(w.shape[1], device=w.device) if self.cols[k] is None else self.cols[k]
        mask[r[:, None], c[None, :]] = True
        return mask

    def poison_keystone_elements(self):
        for k in range(len(self.params)):
            w = self.weights[self.owner[k]]
            w[self.keystone_mask(k)] = poison(torch.empty(1, dtype=w.dtype, device=w.device))

    def step(self, grads, step, *, amsgrad, maximize, grad_scale, beta1, backend, steps=None):
        ops.fused_adamw_scatter(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, [self.weights[o] for o in self.owner],
            self.rows, self.cols, lr=self.lrs, weight_decay=self.wds, step=steps or step, beta1=beta1,
            beta2=0.999, eps=1e-8, max_exp_avg_sqs=self.max_exp_avg_sqs if amsgrad else None, amsgrad=amsgrad,
            maximize=maximize, grad_scale=grad_scale, backend=backend,
        )

    def assert_weights_hold_params(self):
        """Keystone elements == rne(fp32 master), bit for bit; every other element untouched."""
        covered = [torch.zeros(w.shape, dtype=torch.bool, device=w.device) for w in self.weights]
        for k, p in enumerate(self.params):
            w = self.weights[self.owner[k]]
            mask = self.keystone_mask(k)
            covered[self.owner[k]] |= mask
            got = w[mask].view(p.shape) if p.numel() else w[mask]
            assert torch.equal(bits(got), bits(p.to(w.dtype).view(got.shape))), f"tensor {k} was not scattered"
        for w, before, cov in zip(self.weights, self.weights_before, covered):
            assert torch.equal(bits(w[~cov]), bits(before[~cov])), "a non-keystone weight element changed"


def _grads(ks: Keystone, gen: torch.Generator):
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in ks.params]


def _close(a, b):
    # The kernels take IEEE sqrt, torch's vectorised CPU sqrt is within an ulp: a few ulps of
    # difference after 20 steps on O(1) values. A wrong formula is off by ~lr = 1e-3 or more.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags", list(FLAGS), ids=str)
def test_reference_matches_torch_adamw(flags, rng):
    amsgrad, maximize, grad_scale, beta1 = FLAGS[flags]
    ks = Keystone(MIXED, rng)
    masters = [torch.nn.Parameter(p.clone()) for p in ks.params]
    groups = [{"params": [masters[k] for k in range(len(masters)) if ks.lrs[k] == lr], "lr": lr, "weight_decay": wd}
              for lr, wd in ((ROW_LR, ROW_WD), (COL_LR, COL_WD))]
    opt = torch.optim.AdamW(groups, betas=(beta1, 0.999), eps=1e-8, amsgrad=amsgrad, maximize=maximize,
                            foreach=False)
    for step in range(1, 21):
        grads = _grads(ks, rng)
        for master, g in zip(masters, grads):
            master.grad = g * grad_scale
        opt.step()
        ks.step(grads, step, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, beta1=beta1,
                backend="reference")
    for k, master in enumerate(masters):
        state = opt.state[master]
        _close(ks.params[k], master.detach())
        _close(ks.exp_avgs[k], state["exp_avg"])
        _close(ks.exp_avg_sqs[k], state["exp_avg_sq"])
        if amsgrad:
            _close(ks.max_exp_avg_sqs[k], state["max_exp_avg_sq"])
    ks.assert_weights_hold_params()


@pytest.mark.parametrize("flags", list(FLAGS), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
def test_backend_matches_reference(kernel_backend, layout, flags):
    name, device = kernel_backend
    amsgrad, maximize, grad_scale, beta1 = FLAGS[flags]
    runs = {}
    for backend in ("reference", name):
        gen = torch.Generator().manual_seed(11)  # same weights, indices and gradients for both
        ks = Keystone(LAYOUTS[layout], gen, device)
        ks.poison_keystone_elements()  # an element the kernel never scatters stays NaN
        for step in range(1, 6):
            ks.step(_grads(ks, gen), step, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                    beta1=beta1, backend=backend)
        ks.assert_weights_hold_params()
        runs[backend] = ks
    ref, got = runs["reference"], runs[name]
    assert len(got.params) == len(ref.params) > 0
    for k in range(len(ref.params)):
        _close(got.params[k], ref.params[k])
        _close(got.exp_avgs[k], ref.exp_avgs[k])
        _close(got.exp_avg_sqs[k], ref.exp_avg_sqs[k])
        if amsgrad:
            _close(got.max_exp_avg_sqs[k], ref.max_exp_avg_sqs[k])


def test_twenty_steps_per_tensor_steps(kernel_backend):
    """20 steps; tensors at different step counts (one joined the optimizer later)."""
    name, device = kernel_backend
    runs = {}
    for backend in ("reference", name):
        gen = torch.Generator().manual_seed(5)
        ks = Keystone(MIXED, gen, device)
        for step in range(1, 21):
            steps = [step + 3 * (k % 2) for k in range(len(ks.params))]
            ks.step(_grads(ks, gen), None, amsgrad=True, maximize=False, grad_scale=1.0, beta1=0.9,
                    backend=backend, steps=steps)
        ks.assert_weights_hold_params()
        runs[backend] = ks
    for a, b in zip(runs[name].params, runs["reference"].params):
        _close(a, b)


def test_unaligned_tensors(kernel_backend, rng):
    """fp32 arrays that start 4 bytes past a 16-byte boundary take the scalar-load path."""
    name, device = kernel_backend
    shape = (7, 53)

    def unaligned(t):
        buf = torch.empty(t.numel() + 1, device=device)[1:]
        return buf.view(t.shape).copy_(t)

    runs = {}
    for backend in ("reference", name):
        gen = torch.Generator().manual_seed(9)
        w = torch.randn(24, 53, generator=gen).bfloat16().to(device)
        rows = make_index("random", 24, gen)[:7].to(device)
        p, g = unaligned(torch.randn(shape, generator=gen)), unaligned(torch.randn(shape, generator=gen))
        m, v = unaligned(torch.zeros(shape)), unaligned(torch.zeros(shape))
        assert p.data_ptr() % 16 != 0
        ops.fused_adamw_scatter([p], [g], [m], [v], [w], [rows], [None], lr=1e-2, step=1, backend=backend)
        assert torch.equal(bits(w[rows]), bits(p.bfloat16()))
        runs[backend] = (p, m, v)
    for a, b in zip(runs[name], runs["reference"]):
        _close(a, b)


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
    ks = Keystone(MIXED + [(17, 11, torch.bfloat16, "one", "one", False)], rng)
    ks.step(_grads(ks, rng), 1, amsgrad=False, maximize=False, grad_scale=1.0, beta1=0.9, backend="triton")
    ks.assert_weights_hold_params()
    assert len(ks.params) >= 6
    assert len(launches) == len({w.dtype for w in ks.weights}) == 3


# ---------------------------------------------------------------- argument checks


def _valid_args(gen):
    w = torch.randn(6, 5, generator=gen).bfloat16()
    rows = torch.tensor([1, 4])
    p = w[rows].float()
    state = lambda: [torch.zeros_like(p)]  # noqa: E731
    return dict(params=[p], grads=[torch.randn(p.shape, generator=gen)], exp_avgs=state(), exp_avg_sqs=state(),
                weights=[w], rows=[rows], cols=[None])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(grads=[]), "grads has 0 entries, params has 1"),
        (dict(exp_avgs=[torch.zeros(2, 4)]), r"exp_avgs\[0\] must be contiguous with params\[0\]'s shape"),
        (dict(grads=[torch.zeros(2, 5, dtype=torch.float64)]), r"grads\[0\] must have dtype float32"),
        (dict(params=[torch.zeros(5, 2).t()]), r"params\[0\] must be contiguous"),
        (dict(rows=[torch.tensor([4, 1])]), r"rows\[0\] must be sorted and unique"),
        (dict(rows=[torch.tensor([1, 6])]), r"rows\[0\] holds 6, out of range \[0, 6\)"),
        (dict(cols=[torch.tensor([0, 1])]), r"params\[0\] must have shape \(2, 2\)"),
        (dict(step=0), r"step\[0\] = 0: a step must be a whole number >= 1"),
        (dict(lr=[1e-3, 1e-3]), r"lr must be one number or one per tensor \(1\), got 2"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (dict(amsgrad=True), "amsgrad=True needs max_exp_avg_sqs"),
        (dict(max_exp_avg_sqs=[torch.zeros(2, 5)]), "max_exp_avg_sqs given but amsgrad=False"),
        (dict(weights=torch.zeros(6, 5)), "weights must be a list or tuple"),
    ],
)
def test_errors_name_the_argument(change, message, rng):
    args = _valid_args(rng) | dict(lr=1e-3, step=1)
    originals = args["params"] + args["weights"] + args["exp_avgs"]
    before = [t.clone() for t in originals]
    with pytest.raises(ValueError, match=message):
        ops.fused_adamw_scatter(**(args | change))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(before, originals)), "a rejected call wrote"


def test_empty_list_is_a_no_op():
    ops.fused_adamw_scatter([], [], [], [], [], [], [], lr=1e-3, step=1)


# ---------------------------------------------------------------- torch.library integration


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_ext_opcheck(device, amsgrad):
    require_backend("ext", device)
    ks = Keystone(MIXED, torch.Generator().manual_seed(4), device)
    grads = _grads(ks, torch.Generator().manual_seed(5))
    args = (ks.params, grads, ks.exp_avgs, ks.exp_avg_sqs, ks.max_exp_avg_sqs if amsgrad else [],
            # opcheck wants no aliasing between mutated inputs: a private weight per tensor
            [ks.weights[o].clone() for o in ks.owner], ks.rows, ks.cols, ks.lrs, ks.wds, [3] * len(ks.params),
            0.9, 0.999, 1e-8, amsgrad, False, 1.0)
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
            ks.step(_grads(ks, gen), step, amsgrad=True, maximize=False, grad_scale=1.0, beta1=0.9, backend=name)
        ks.assert_weights_hold_params()
        runs[name] = ks
    for a, b in zip(runs[backend].params, runs["reference"].params):
        _close(a, b)

"""gather_wgrad: every backend against the reference, the reference against dense float64 math."""

from __future__ import annotations

import pytest
import torch
from conftest import INDEX_CASES, gpu, make_index, poisoned_allocations, require_backend, requires_cuda

from keystone_kernels import ops
from keystone_kernels.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, out, in): empty batch, one token, odd / prime sizes, T past several 16-32 token blocks.
SHAPES = [(0, 37, 53), (1, 37, 53), (29, 41, 19), (67, 37, 53)]


def _inputs(shape, dtype, rows_kind, cols_kind, gen, device="cpu"):
    T, out, inp = shape
    grad_out = torch.randn(T, out, generator=gen).to(dtype)
    x = torch.randn(T, inp, generator=gen).to(dtype)
    rows, cols = make_index(rows_kind, out, gen), make_index(cols_kind, inp, gen)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(grad_out), move(x), move(rows), move(cols)


def _tol(T: int) -> dict:
    # Inputs are exact in fp32 (products of bf16/fp16 values too); only the fp32 summation order
    # differs between backends: error grows like sqrt(T) * eps * |terms|.
    return dict(rtol=1e-5, atol=2e-6 * max(T, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}x{}x{}".format(*s))
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES)
def test_reference_matches_dense_float64(dtype, shape, rows_kind, cols_kind, rng):
    grad_out, x, rows, cols = _inputs(shape, dtype, rows_kind, cols_kind, rng)
    dense = grad_out.double().t() @ x.double()  # the full dW, float64
    if rows is not None:
        dense = dense[rows]
    if cols is not None:
        dense = dense[:, cols]
    got = reference.gather_wgrad(grad_out, x, rows, cols)
    assert got.dtype == torch.float32
    assert got.shape == dense.shape
    torch.testing.assert_close(got.double(), dense, **_tol(shape[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}x{}x{}".format(*s))
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES)
def test_backend_matches_reference(kernel_backend, dtype, shape, rows_kind, cols_kind, rng):
    name, device = kernel_backend
    grad_out, x, rows, cols = _inputs(shape, dtype, rows_kind, cols_kind, rng, device)
    expected = reference.gather_wgrad(grad_out, x, rows, cols)
    with poisoned_allocations():
        got = ops.gather_wgrad(grad_out, x, rows, cols, backend=name)
    assert got.dtype == torch.float32 and got.device == grad_out.device
    assert got.shape == expected.shape
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got, expected, **_tol(shape[0]))


def test_poisoned_allocations_poison():
    # The backend test above relies on this: without it an unwritten output could pass by luck.
    with poisoned_allocations():
        assert torch.empty(7, 5).isnan().all()
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_inputs(kernel_backend, layout, rng):
    name, device = kernel_backend
    T, out, inp = 45, 33, 27
    if layout == "transposed":  # column-major storage: stride(1) == T
        grad_out = torch.randn(out, T, generator=rng).t()
        x = torch.randn(inp, T, generator=rng).t()
    else:  # every other token and a column offset: stride(0) != size(1)
        grad_out = torch.randn(2 * T, out + 5, generator=rng)[::2, 3 : 3 + out]
        x = torch.randn(2 * T, inp + 4, generator=rng)[::2, 1 : 1 + inp]
    grad_out, x = grad_out.to(device), x.to(device)
    rows = make_index("random", out, rng).to(device)
    cols = make_index("random", inp, rng).to(device)
    expected = reference.gather_wgrad(grad_out, x, rows, cols)
    got = ops.gather_wgrad(grad_out, x, rows, cols, backend=name)
    torch.testing.assert_close(got, expected, **_tol(T))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_split_t(device, splits, dtype, rng):
    """The split-T path (fp32 partials summed by the launcher), forced at small sizes."""
    require_backend("triton", device)
    from keystone_kernels.ops.triton.wgrad import gather_wgrad

    grad_out, x, rows, cols = _inputs((83, 29, 40), dtype, "random", "none", rng, device)
    expected = reference.gather_wgrad(grad_out, x, rows, cols)
    with poisoned_allocations():
        got = gather_wgrad(grad_out, x, rows, cols, splits=splits, block_t=16)
    torch.testing.assert_close(got, expected, **_tol(83))


class _AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_full_size_allocation(backend, rng):
    """Every tensor made while computing a keystone gradient is far smaller than [out, in]."""
    require_backend(backend, "cpu")
    T, out, inp = 8, 96, 80
    grad_out, x = torch.randn(T, out, generator=rng), torch.randn(T, inp, generator=rng)
    for rows, cols in [(torch.tensor([3, 50]), None), (None, torch.tensor([1, 7, 79]))]:
        with _AllocationRecorder() as rec:
            ops.gather_wgrad(grad_out, x, rows, cols, backend=backend)
        assert rec.numels, "the recorder saw no op"
        assert max(rec.numels) < out * inp // 4


# ---------------------------------------------------------------- argument checks and dispatch


def test_errors_name_the_argument():
    g, x = torch.randn(4, 6), torch.randn(4, 5)
    with pytest.raises(ValueError, match="grad_out"):
        ops.gather_wgrad(g.to(torch.float64), x.double())
    with pytest.raises(ValueError, match="x must have dtype"):
        ops.gather_wgrad(g, x.bfloat16())
    with pytest.raises(ValueError, match="same T"):
        ops.gather_wgrad(g, torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.gather_wgrad(g, torch.randn(4))
    with pytest.raises(ValueError, match=r"rows holds 6, out of range \[0, 6\)"):
        ops.gather_wgrad(g, x, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"cols holds -1"):
        ops.gather_wgrad(g, x, None, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="rows must have dtype int64"):
        ops.gather_wgrad(g, x, torch.tensor([0, 1], dtype=torch.int32))


def test_ext_op_checks_its_arguments():
    """Calling torch.ops.keystone directly (no Python validation) still fails with a message."""
    from keystone_kernels.ops import ext

    ext.load()
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 9 is out of range"):
        torch.ops.keystone.gather_wgrad(torch.randn(3, 6), torch.randn(3, 5), torch.tensor([0, 9]), None)
    with pytest.raises(RuntimeError, match="x must have grad_out's dtype"):
        torch.ops.keystone.gather_wgrad(torch.randn(3, 6), torch.randn(3, 5).half(), None, None)


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("KEYSTONE_BACKEND", raising=False)
    assert ops.resolve_backend(None, "cpu") == "ext"  # auto on the CPU: the C++ extension
    assert ops.resolve_backend("Reference", "cpu") == "reference"
    monkeypatch.setenv("KEYSTONE_BACKEND", "reference")
    assert ops.resolve_backend(None, "cpu") == "reference"
    assert ops.resolve_backend("ext", "cpu") == "ext"  # an explicit argument beats the variable
    with pytest.raises(ValueError, match="auto, reference, triton, ext"):
        ops.resolve_backend("cutlass", "cpu")
    monkeypatch.setenv("KEYSTONE_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"'bogus' \(\$KEYSTONE_BACKEND\) is not a keystone backend"):
        ops.resolve_backend(None, "cpu")
    assert set(ops.available_backends("cpu")) >= {"reference", "ext"}


def test_env_backend_routes_calls(monkeypatch, rng):
    """KEYSTONE_BACKEND picks the implementation that actually runs."""
    calls = []
    monkeypatch.setattr(reference, "gather_wgrad", lambda *a: calls.append(a) or torch.zeros(1, 1))
    monkeypatch.setenv("KEYSTONE_BACKEND", "reference")
    ops.gather_wgrad(torch.randn(2, 3, generator=rng), torch.randn(2, 4, generator=rng), torch.tensor([1]))
    assert len(calls) == 1


# ---------------------------------------------------------------- torch.library integration


def _opcheck_samples():
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        g, x = torch.randn(13, 11, generator=gen).to(dtype), torch.randn(13, 7, generator=gen).to(dtype)
        yield g, x, torch.tensor([0, 4, 10]), torch.tensor([2, 3])
        yield g, x, None, torch.tensor([6])
        yield g, x, torch.tensor([5]), None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
def test_ext_opcheck(device):
    require_backend("ext", device)
    for sample in _opcheck_samples():
        sample = tuple(None if t is None else t.to(device) for t in sample)
        torch.library.opcheck(torch.ops.keystone.gather_wgrad.default, sample)


def test_ext_under_torch_compile(rng):
    require_backend("ext", "cpu")
    g, x = torch.randn(9, 12, generator=rng), torch.randn(9, 10, generator=rng)
    rows, cols = torch.tensor([1, 5, 11]), torch.tensor([0, 9])
    fn = torch.compile(lambda g, x: ops.gather_wgrad(g, x, rows, cols, backend="ext") * 2, backend="aot_eager")
    torch.testing.assert_close(fn(g, x), 2 * reference.gather_wgrad(g, x, rows, cols))


@gpu
@requires_cuda
def test_triton_opcheck_and_compile_cuda(rng):
    require_backend("triton", "cuda")
    for sample in _opcheck_samples():
        sample = tuple(None if t is None else t.cuda() for t in sample)
        torch.library.opcheck(torch.ops.keystone_triton.gather_wgrad.default, sample)
    g, x = torch.randn(64, 96, device="cuda").bfloat16(), torch.randn(64, 80, device="cuda").bfloat16()
    rows = torch.tensor([2, 40, 95], device="cuda")
    fn = torch.compile(lambda g, x: ops.gather_wgrad(g, x, rows, None, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(g, x), reference.gather_wgrad(g, x, rows, None), **_tol(64))


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_cuda(backend, dtype):
    """Model-sized shapes on the GPU: many tiles, split T, 1% of rows / columns."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(3)
    T, out, inp = 4099, 2048, 1536
    grad_out = torch.randn(T, out, generator=gen).to(dtype).cuda()
    x = torch.randn(T, inp, generator=gen).to(dtype).cuda()
    for rows, cols in [(make_index("random", out, gen)[:21], None), (None, make_index("random", inp, gen)[:15])]:
        rows = None if rows is None else rows.cuda()
        cols = None if cols is None else cols.cuda()
        expected = reference.gather_wgrad(grad_out, x, rows, cols)
        got = ops.gather_wgrad(grad_out, x, rows, cols, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)

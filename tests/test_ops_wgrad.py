"""gather_wgrad: every backend against the reference, the reference against dense float64 math."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    INDEX_CASES,
    OPS,
    complement,
    gpu,
    make_index,
    poisoned_allocations,
    record_launch_devices,
    require_backend,
    requires_cuda,
)

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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}x{}x{}".format(*s))
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES + [("complement", "random"), ("complement", "none")])
def test_reference_matches_dense_float64(device, dtype, shape, rows_kind, cols_kind, rng):
    """CPU: the upcast path. CUDA, bf16 / fp16: the tensor-core path (one GEMM with an fp32 result)."""
    complement_rows = rows_kind == "complement"  # most rows: a column block's rows (the full-product branch)
    grad_out, x, rows, cols = _inputs(shape, dtype, "random" if complement_rows else rows_kind, cols_kind, rng,
                                      device)
    if complement_rows:
        rows = complement(rows.cpu(), shape[1]).to(device)
    dense = grad_out.double().t() @ x.double()  # the full dW, float64
    if rows is not None:
        dense = dense[rows]
    if cols is not None:
        dense = dense[:, cols]
    got = reference.gather_wgrad(grad_out, x, rows, cols)
    assert got.dtype == torch.float32
    assert got.shape == dense.shape
    torch.testing.assert_close(got.double(), dense, **_tol(shape[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows_kind,cols_kind", [("none", "random"), ("one", "none"), ("random", "none"),
                                                 ("complement", "random"), ("explicit_all", "none")])
def test_reference_tensor_core_path_shapes_on_meta(dtype, rows_kind, cols_kind, rng):
    """The CUDA path's torch.mm(out_dtype=float32) call checked on meta tensors (no GPU here): shapes, dtype."""
    T, out, inp = 67, 37, 53
    rows = make_index("random" if rows_kind == "complement" else rows_kind, out, rng)
    if rows_kind == "complement":
        rows = complement(rows, out)
    cols = make_index(cols_kind, inp, rng)
    grad_out = torch.empty(T, out, dtype=dtype, device="meta")
    x = torch.empty(T, inp, dtype=dtype, device="meta")
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    got = reference.gather_wgrad(grad_out, x, meta(rows), meta(cols))
    assert got.device.type == "meta" and got.dtype == torch.float32
    assert tuple(got.shape) == (out if rows is None else len(rows), inp if cols is None else len(cols))


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("copy_first", [True, False], ids=["copy-first", "gather-in-kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 53), (67, 41, 19)], ids=lambda s: "T{}x{}x{}".format(*s))
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES)
def test_triton_both_gather_paths(device, copy_first, dtype, shape, rows_kind, cols_kind, rng):
    """Indices gathered by index_select before the kernel, or by the kernel's loads, whatever their density."""
    require_backend("triton", device)
    from keystone_kernels.ops.triton.wgrad import gather_wgrad

    grad_out, x, rows, cols = _inputs(shape, dtype, rows_kind, cols_kind, rng, device)
    expected = reference.gather_wgrad(grad_out, x, rows, cols)
    with poisoned_allocations():
        got = gather_wgrad(grad_out, x, rows, cols, copy_first=copy_first)
    assert got.shape == expected.shape and not got.isnan().any()
    torch.testing.assert_close(got, expected, **_tol(shape[0]))


def test_triton_copies_only_sparse_indices(monkeypatch, rng):
    """The default copies a sparse index's columns first (the keystone rows) and gathers a dense
    one (every row but the keystone ones) in the kernel; the results agree either way."""
    require_backend("triton", "cpu")
    from keystone_kernels.ops.triton import wgrad

    copied = []
    real_index_select = torch.Tensor.index_select

    def index_select(t, dim, idx):
        copied.append(len(idx))
        return real_index_select(t, dim, idx)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    T, out, inp = 40, 90, 70
    grad_out, x = torch.randn(T, out, generator=rng), torch.randn(T, inp, generator=rng)
    sparse, dense = torch.tensor([3, 17, 89]), torch.arange(out)[torch.arange(out) % 11 != 0]
    for rows, want in ((sparse, [3]), (dense, [])):
        copied.clear()
        got = wgrad.gather_wgrad(grad_out, x, rows, None)
        assert copied == want
        torch.testing.assert_close(got, reference.gather_wgrad(grad_out, x, rows, None), **_tol(T))


def test_triton_launches_under_the_tensors_device(monkeypatch, rng):
    """The launch runs inside the device context of the operands (what makes cuda:1 work)."""
    require_backend("triton", "cpu")
    from keystone_kernels.ops.triton import wgrad

    seen = record_launch_devices(monkeypatch, wgrad)
    grad_out, x, rows, cols = _inputs((23, 31, 17), torch.float32, "random", "random", rng)
    got = wgrad.gather_wgrad(grad_out, x, rows, cols)
    assert seen == [grad_out.device]
    torch.testing.assert_close(got, reference.gather_wgrad(grad_out, x, rows, cols), **_tol(23))


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_second_cuda_device(backend, rng):
    """Tensors on cuda:1 while cuda:0 is current: the kernel must run on cuda:1."""
    require_backend(backend, "cuda")
    grad_out, x, rows, cols = _inputs((70, 45, 33), torch.bfloat16, "random", "random", rng, "cuda:1")
    with torch.cuda.device(0):
        got = ops.gather_wgrad(grad_out, x, rows, cols, backend=backend)
    assert got.device == grad_out.device
    torch.testing.assert_close(got, reference.gather_wgrad(grad_out, x, rows, cols), **_tol(70))


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


class _NoLaunch:
    """A stand-in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_full_size_allocation(backend, rng, monkeypatch):
    """Every tensor made while computing a keystone gradient is far smaller than [out, in].

    Triton: the launcher's own tensors, with the kernel stubbed (the CPU interpreter that would run it
    allocates copies of its own, which a GPU launch does not)."""
    require_backend(backend, "cpu")
    if backend == "triton":
        from keystone_kernels.ops.triton import wgrad

        monkeypatch.setattr(wgrad, "_gather_wgrad_kernel", _NoLaunch())
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


def test_auto_on_cuda_routes_the_weight_gradient_to_the_reference(monkeypatch):
    """docs/design.md: until a kernel beats cuBLAS in the GPU bench, "auto" runs gather_wgrad on the
    reference on CUDA; the other ops, and any explicitly named backend, are unaffected."""
    monkeypatch.delenv("KEYSTONE_BACKEND", raising=False)
    assert ops.AUTO_CUDA_OPS == {"gather_wgrad": "reference"}
    assert ops.resolve_backend("auto", "cuda", op="gather_wgrad") == "reference"
    assert ops.resolve_backend(None, "cuda", op="gather_wgrad") == "reference"
    assert ops.resolve_backend("auto", "cpu", op="gather_wgrad") == "ext"  # the CPU is not in the table
    monkeypatch.setenv("KEYSTONE_BACKEND", "ext")
    assert ops.resolve_backend(None, "cpu", op="gather_wgrad") == "ext"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on cuda"):  # named: never rerouted
            ops.resolve_backend("triton", "cuda", op="gather_wgrad")


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
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_opcheck(backend, device):
    """torch.library.opcheck of the registered op (schema, fake tensor, autograd registration)."""
    require_backend(backend, device)
    op = OPS[backend].gather_wgrad.default
    for sample in _opcheck_samples():
        torch.library.opcheck(op, tuple(None if t is None else t.to(device) for t in sample))


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_under_torch_compile_fullgraph(backend, rng):
    """No graph break, and the compiled result equals the reference (aot_eager: runs on the CPU)."""
    require_backend(backend, "cpu")
    g, x = torch.randn(9, 12, generator=rng), torch.randn(9, 10, generator=rng)
    rows, cols = torch.tensor([1, 5, 11]), torch.tensor([0, 9])

    def fn(g, x):
        return ops.gather_wgrad(g, x, rows, cols, backend=backend) * 2

    explanation = torch._dynamo.explain(fn)(g, x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(g, x), 2 * reference.gather_wgrad(g, x, rows, cols))
    # A second token count recompiles with a symbolic T: the fake function must handle it.
    g, x = torch.randn(14, 12, generator=rng), torch.randn(14, 10, generator=rng)
    torch.testing.assert_close(compiled(g, x), 2 * reference.gather_wgrad(g, x, rows, cols))


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_inductor_compile_cuda(backend, rng):
    """The GPU compile path: Inductor, bf16, a token count that changes between calls."""
    require_backend(backend, "cuda")
    rows = torch.tensor([2, 40, 95], device="cuda")
    fn = torch.compile(lambda g, x: ops.gather_wgrad(g, x, rows, None, backend=backend), fullgraph=True)
    for T in (64, 97, 130):
        g = torch.randn(T, 96, generator=rng).bfloat16().cuda()
        x = torch.randn(T, 80, generator=rng).bfloat16().cuda()
        torch.testing.assert_close(fn(g, x), reference.gather_wgrad(g, x, rows, None), **_tol(T))


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


def test_bench_wgrad_variants_compute_the_same_gradients():
    """The benchmark's index_select + mm baseline and the Triton kernel give the reference's gradients,
    and bench_wgrad times the baseline beside Triton."""
    require_backend("triton", "cpu")
    from keystone_kernels import bench

    shape = bench.Shape("tiny", "llama", 24, 40, 2, 4, 2, 32, True)
    case = bench.WgradCase.build(shape, tokens=19, device="cpu", seed=3)
    want, _, _ = case.keystone_fn(0.25, "reference")
    expected = want()
    assert len(expected) >= 2 and all(g.abs().sum() > 0 for g in expected)
    for variant in (bench.WGRAD_MM, "triton"):
        got = case.keystone_fn(0.25, variant)[0]()
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, e, **_tol(19))
    result = bench.bench_wgrad(shape, [0.25], ["triton"], torch.device("cpu"), 19, warmup=0, reps=1, min_time_s=0,
                               log=lambda _: None)
    assert [k["backend"] for k in result["keystone"]] == ["triton", bench.WGRAD_MM]

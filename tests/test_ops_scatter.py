"""scatter_to_frozen: bit-exact against the reference; the reference's rounding against integer RNE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    INDEX_CASES,
    OPS,
    bits,
    gpu,
    make_index,
    poison,
    record_launch_devices,
    require_backend,
    requires_cuda,
)

from keystone_kernels import ops
from keystone_kernels.ops import reference

# Values past float16's range overflow to inf on purpose (numpy and the Triton interpreter warn).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 53), (5, 300), (130, 3)]  # prime; wider than one 128-column tile; many row tiles


def hard_values(n: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """fp32 [n, m] where rounding matters: random low bits, exact ties of ``dtype``, values past
    its range and below its normal range, signed zeros, infinities."""
    x = torch.randn(n, m, generator=gen) * 3
    u = x.view(torch.int32)
    pick = torch.randint(0, 8, (n, m), generator=gen)
    drop = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}[dtype]
    if drop:  # a value exactly halfway between two neighbours of dtype: RNE breaks the tie to even
        tie = (u >> drop << drop) | (1 << (drop - 1))
        u = torch.where(pick == 1, tie, u)
    x = u.view(torch.float32)
    x = torch.where(pick == 2, x * 1e5, x)  # beyond float16's 65504: rounds to inf
    x = torch.where(pick == 3, x * 1e-6, x)  # float16 subnormals
    x = torch.where(pick == 4, torch.tensor(-0.0), x)
    if n * m >= 2:
        x.view(-1)[0], x.view(-1)[-1] = float("inf"), float("-inf")
    return x


def _weight(shape, dtype, layout, gen, device="cpu"):
    out, inp = shape
    if layout == "transposed":  # [in, out] storage seen as [out, in], as for GPT-2's Conv1D
        return torch.randn(inp, out, generator=gen).to(dtype).t().to(device)
    return torch.randn(out, inp, generator=gen).to(dtype).to(device)


def _keystone_view(weight, rows, cols):
    r = torch.arange(weight.shape[0], device=weight.device) if rows is None else rows
    c = torch.arange(weight.shape[1], device=weight.device) if cols is None else cols
    return r[:, None], c[None, :]


def _rne_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even fp32 -> bf16 in int64 arithmetic, NaN -> 0x7FC0: an independent oracle."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = torch.where(x.isnan(), torch.tensor(0x7FC0), r)
    return r.to(torch.int32).to(torch.int16)  # two's-complement wrap of the top bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES)
def test_reference_rounds_to_nearest_even(dtype, rows_kind, cols_kind, rng):
    weight = _weight((37, 53), dtype, "contiguous", rng)
    rows, cols = make_index(rows_kind, 37, rng), make_index(cols_kind, 53, rng)
    n = 37 if rows is None else len(rows)
    m = 53 if cols is None else len(cols)
    src = hard_values(n, m, dtype, rng)
    before = weight.clone()
    reference.scatter_to_frozen(weight, src, rows, cols)
    ix = _keystone_view(weight, rows, cols)
    if dtype == torch.bfloat16:
        expected = _rne_bf16_bits(src)
    elif dtype == torch.float16:
        expected = torch.from_numpy(src.numpy().astype(np.float16)).view(torch.int16)
    else:
        expected = src.view(torch.int32)
    assert torch.equal(bits(weight[ix]), expected)
    untouched = torch.ones(weight.shape, dtype=torch.bool)
    untouched[ix] = False
    assert torch.equal(bits(weight)[untouched], bits(before)[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("rows_kind,cols_kind", INDEX_CASES)
def test_backend_matches_reference(kernel_backend, dtype, shape, layout, rows_kind, cols_kind, rng):
    name, device = kernel_backend
    weight = _weight(shape, dtype, layout, rng, device)
    rows, cols = make_index(rows_kind, shape[0], rng), make_index(cols_kind, shape[1], rng)
    rows = None if rows is None else rows.to(device)
    cols = None if cols is None else cols.to(device)
    n = shape[0] if rows is None else len(rows)
    m = shape[1] if cols is None else len(cols)
    src = hard_values(n, m, dtype, rng).to(device)

    expected = weight.clone()
    reference.scatter_to_frozen(expected, src, rows, cols)
    got = weight.clone()
    ix = _keystone_view(got, rows, cols)
    got[ix] = poison(got[ix])  # a keystone element the kernel skips stays NaN
    ops.scatter_to_frozen(got, src, rows, cols, backend=name)
    # Bit-identical everywhere: rounded keystone values and untouched frozen ones alike.
    assert torch.equal(bits(got), bits(expected))


def test_nan_stays_nan(kernel_backend):
    name, device = kernel_backend
    for dtype in DTYPES:
        weight = torch.ones(3, 4, dtype=dtype, device=device)
        src = torch.tensor([[float("nan"), 1.0], [2.0, float("-nan")]], device=device)
        ops.scatter_to_frozen(weight, src, torch.tensor([0, 2], device=device), torch.tensor([1, 3], device=device),
                              backend=name)
        assert weight[0, 1].isnan() and weight[2, 3].isnan()
        assert weight[0, 3] == 1 and weight[2, 1] == 2 and weight.isnan().sum() == 2


def test_non_contiguous_src(kernel_backend, rng):
    name, device = kernel_backend
    weight = torch.randn(20, 30, generator=rng).bfloat16().to(device)
    rows, cols = make_index("random", 20, rng).to(device), make_index("random", 30, rng).to(device)
    src = torch.randn(len(cols), len(rows), generator=rng).to(device).t()  # column-major
    expected = weight.clone()
    reference.scatter_to_frozen(expected, src, rows, cols)
    ops.scatter_to_frozen(weight, src, rows, cols, backend=name)
    assert torch.equal(bits(weight), bits(expected))


# ---------------------------------------------------------------- argument checks


def test_errors_name_the_argument():
    w = torch.zeros(6, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="src must have dtype float32"):
        ops.scatter_to_frozen(w, torch.randn(2, 5).bfloat16(), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="weight must have dtype"):
        ops.scatter_to_frozen(w.to(torch.int32), torch.randn(2, 5), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=r"src must have shape \(2, 5\)"):
        ops.scatter_to_frozen(w, torch.randn(2, 4), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="rows must be sorted and unique"):
        ops.scatter_to_frozen(w, torch.randn(2, 5), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="cols must be sorted and unique"):
        ops.scatter_to_frozen(w, torch.randn(6, 2), None, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"cols holds 5, out of range \[0, 5\)"):
        ops.scatter_to_frozen(w, torch.randn(6, 2), None, torch.tensor([2, 5]))
    assert not w.any(), "a rejected call wrote into the weight"


def test_index_check_is_remembered_until_the_index_changes():
    w = torch.zeros(6, 5)
    rows = torch.tensor([1, 3])
    ops.scatter_to_frozen(w, torch.ones(2, 5), rows, backend="reference")  # checked and remembered
    rows[1] = 9  # bumps rows._version: the next call must check again
    with pytest.raises(ValueError, match="rows holds 9"):
        ops.scatter_to_frozen(w, torch.ones(2, 5), rows, backend="reference")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])])
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_opcheck(backend, device, rng):
    """torch.library.opcheck of the registered in-place op (schema, mutation, fake tensor)."""
    require_backend(backend, device)
    op = OPS[backend].scatter_to_frozen.default
    for dtype in DTYPES:
        w = torch.randn(11, 9, generator=rng).to(dtype).to(device)
        for rows, cols in [(torch.tensor([0, 4, 10]), torch.tensor([2, 3])), (None, torch.tensor([8])),
                           (torch.tensor([5]), None)]:
            rows = None if rows is None else rows.to(device)
            cols = None if cols is None else cols.to(device)
            src = torch.randn(11 if rows is None else len(rows), 9 if cols is None else len(cols), generator=rng)
            torch.library.opcheck(op, (w, src.to(device), rows, cols))


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_under_torch_compile_fullgraph(backend, rng):
    """No graph break; the compiled in-place scatter writes the same bits as the reference."""
    require_backend(backend, "cpu")
    w = torch.randn(8, 6, generator=rng).bfloat16()
    rows, cols = torch.tensor([1, 6]), torch.tensor([0, 3, 5])
    src = hard_values(2, 3, torch.bfloat16, rng)
    expected = w.clone()
    reference.scatter_to_frozen(expected, src * 2, rows, cols)

    def step(w, src):
        ops.scatter_to_frozen(w, src * 2, rows, cols, backend=backend)

    explanation = torch._dynamo.explain(step)(w.clone(), src)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    torch.compile(step, backend="aot_eager", fullgraph=True)(w, src)
    assert torch.equal(bits(w), bits(expected))


def test_triton_launches_under_the_weights_device(monkeypatch, rng):
    """The launch runs inside the device context of the weight (what makes cuda:1 work)."""
    require_backend("triton", "cpu")
    from keystone_kernels.ops.triton import scatter

    seen = record_launch_devices(monkeypatch, scatter)
    weight = torch.randn(13, 7, generator=rng).bfloat16()
    rows = torch.tensor([0, 5, 12])
    src = hard_values(3, 7, torch.bfloat16, rng)
    expected = weight.clone()
    reference.scatter_to_frozen(expected, src, rows, None)
    scatter.scatter_to_frozen(weight, src, rows, None)
    assert seen == [weight.device]
    assert torch.equal(bits(weight), bits(expected))


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_second_cuda_device(backend, rng):
    """A weight on cuda:1 while cuda:0 is current: the kernel must write on cuda:1."""
    require_backend(backend, "cuda")
    weight = torch.randn(37, 53, generator=rng).bfloat16()
    rows, cols = make_index("random", 37, rng), make_index("random", 53, rng)
    src = hard_values(len(rows), len(cols), torch.bfloat16, rng)
    expected = weight.clone()
    reference.scatter_to_frozen(expected, src, rows, cols)
    weight = weight.to("cuda:1")
    with torch.cuda.device(0):
        ops.scatter_to_frozen(weight, src.to("cuda:1"), rows.to("cuda:1"), cols.to("cuda:1"), backend=backend)
    assert torch.equal(bits(weight.cpu()), bits(expected))

"""Gather weight gradient in Triton: ``dW[rows][:, cols] = dY[:, rows]^T @ X[:, cols]``.

The math, for one keystone tensor addressed by (rows, cols) of a linear layer ``Y = X W^T``::

    dW[i, j] = sum_t dY[t, r(i)] * X[t, c(j)]      r(i) = rows[i] or i, c(j) = cols[j] or j

Each program owns one [BLOCK_N, BLOCK_M] tile of the output and a slice of the T axis, multiplies
``[BLOCK_N, BLOCK_T] x [BLOCK_T, BLOCK_M]`` tiles with ``tl.dot`` (tensor cores for bf16 / fp16 on
the GPU) and accumulates in fp32. Nothing of size [out, in] is ever made.

Where the columns come from depends on how dense the index is (:func:`_copy_first`): a sparse one
(the keystone rows R, ~1% of out) is gathered once into a contiguous ``[T, |R|]`` copy with
``index_select`` and the kernel runs dense tiles on it; a dense one (every row but R, which the
column gradient uses) is gathered by the kernel's own loads, which are then nearly contiguous.

When the output has too few tiles to fill the GPU, T is split over ``splits`` programs that each
write their own fp32 partial; the launcher sums the partials (no atomics: deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import check_device, index_or_arange, interpreting, on_device

__all__ = ["gather_wgrad", "gather_wgrad_op"]


@triton.jit
def _gather_wgrad_kernel(
    DY,  # [T, out] grad of the layer output, strides (stride_dy_t, stride_dy_c)
    X,  # [T, in] layer input, strides (stride_x_t, stride_x_c)
    ROWS,  # [N] int64 columns of DY to use (rows of W), read only when HAS_ROWS
    COLS,  # [M] int64 columns of X to use (columns of W), read only when HAS_COLS
    OUT,  # [SPLITS, N, M] fp32, contiguous: one partial dW per T slice
    T,  # number of tokens
    N,  # output rows: len(rows) or out
    M,  # output columns: len(cols) or in
    T_PER_SPLIT,  # tokens per T slice (a multiple of BLOCK_T)
    stride_dy_t,
    stride_dy_c,
    stride_x_t,
    stride_x_c,
    HAS_ROWS: tl.constexpr,  # False: DY's columns in order
    HAS_COLS: tl.constexpr,  # False: X's columns in order
    UPCAST: tl.constexpr,  # upcast tiles to fp32 before tl.dot (interpreter bf16 workaround)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs (no TF32)
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """OUT[s, i, j] = sum over t in slice s of DY[t, r(i)] * X[t, c(j)], accumulated in fp32."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    src_n = index_or_arange(ROWS, offs_n, mask_n, HAS_ROWS)
    src_m = index_or_arange(COLS, offs_m, mask_m, HAS_COLS)

    t_start = pid_s * T_PER_SPLIT
    t_end = tl.minimum(t_start + T_PER_SPLIT, T)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    # dY^T tile [BLOCK_N, BLOCK_T] and X tile [BLOCK_T, BLOCK_M].
    dy_ptrs = DY + src_n[:, None] * stride_dy_c + (t_start + offs_t)[None, :] * stride_dy_t
    x_ptrs = X + (t_start + offs_t)[:, None] * stride_x_t + src_m[None, :] * stride_x_c

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        mask_t = (t0 + offs_t) < t_end
        a = tl.load(dy_ptrs, mask=mask_n[:, None] & mask_t[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=mask_t[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_T * stride_dy_t
        x_ptrs += BLOCK_T * stride_x_t

    out_ptrs = OUT + pid_s * N * M + offs_n[:, None] * M + offs_m[None, :]
    tl.store(out_ptrs, acc, mask=mask_n[:, None] & mask_m[None, :])


def _copy_first(k: int, total: int) -> bool:
    """Gather ``k`` of an operand's ``total`` columns into a contiguous copy before the kernel?

    Yes for a sparse index: gathered by the kernel from a row-major [T, total] operand, each 2-byte
    element costs its own 32-byte sector load, and that again for every tile along the other output
    axis; the copy pays those loads once, then the kernel streams dense tiles. No for a dense index:
    the kernel's gathered loads are nearly contiguous, and a copy would add a pass over the operand.
    """
    return 2 * k <= total


_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _default_splits(T: int, tiles: int, block_t: int, device: torch.device) -> int:
    """Split T when the output alone cannot fill the GPU (few keystone rows, many tokens)."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(2 * _sm_count(device), max(tiles, 1))
    # A slice shorter than 8 T-blocks spends more on its partial than it saves.
    return max(1, min(want, triton.cdiv(T, 8 * block_t)))


@dataclass(frozen=True)
class _Plan:
    """The launch of one problem shape: what to gather first, the tiles, the T split and the grid."""

    copy_rows: bool
    copy_cols: bool
    block_n: int
    block_m: int
    block_t: int
    splits: int
    t_per_split: int
    grid: tuple[int, int, int]
    upcast: bool
    precision: str


# (T, out, in, n, m, has rows, has cols, dtype, device, overrides) -> _Plan. The shapes of a training
# run repeat every step, so the Python arithmetic of a plan (about 20 us) runs once per shape.
_plans: dict[tuple, _Plan] = {}


def _plan(T: int, total_n: int, total_m: int, n: int, m: int, has_rows: bool, has_cols: bool, dtype: torch.dtype,
          device: torch.device, copy_first: bool | None, splits: int | None, block_n: int | None,
          block_m: int | None, block_t: int | None) -> _Plan:
    key = (T, total_n, total_m, n, m, has_rows, has_cols, dtype, device, copy_first, splits, block_n, block_m, block_t)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    copy_rows = has_rows and (_copy_first(n, total_n) if copy_first is None else copy_first)
    copy_cols = has_cols and (_copy_first(m, total_m) if copy_first is None else copy_first)
    # tl.dot needs every block dimension >= 16.
    block_n = block_n or (16 if n <= 16 else 32 if n <= 32 else 64)
    block_m = block_m or (64 if m >= 64 else 32 if m > 16 else 16)
    block_t = block_t or (32 if dtype == torch.float32 else 64)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits = splits or _default_splits(T, tiles, block_t, device)
    t_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, t_per_split)  # no empty slice
    upcast = interpreting() and dtype == torch.bfloat16
    plan = _Plan(copy_rows, copy_cols, block_n, block_m, block_t, splits, t_per_split,
                 (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits), upcast,
                 "ieee" if upcast or dtype == torch.float32 else "tf32")
    _plans[key] = plan
    return plan


def gather_wgrad(
    grad_out: Tensor,
    x: Tensor,
    rows: Tensor | None,
    cols: Tensor | None,
    *,
    copy_first: bool | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    block_t: int | None = None,
) -> Tensor:
    """Launcher. grad_out [T, out], x [T, in] (fp32/bf16/fp16) -> fp32 [len(rows) or out, len(cols) or in].

    ``copy_first`` (gather both indices before the kernel: True, in it: False, by density: None),
    ``splits`` and ``block_*`` override the tuning; tests use them to reach every code path. The
    tuning of each shape is computed once (:func:`_plan`).
    """
    check_device("gather_wgrad", grad_out, x)
    T = grad_out.shape[0]
    n = grad_out.shape[1] if rows is None else rows.shape[0]
    m = x.shape[1] if cols is None else cols.shape[0]
    if n == 0 or m == 0 or T == 0:
        return grad_out.new_zeros((n, m), dtype=torch.float32)
    plan = _plan(T, grad_out.shape[1], x.shape[1], n, m, rows is not None, cols is not None, grad_out.dtype,
                 grad_out.device, copy_first, splits, block_n, block_m, block_t)
    with on_device(grad_out):
        if plan.copy_rows:
            grad_out, rows = grad_out.index_select(1, rows), None
        if plan.copy_cols:
            x, cols = x.index_select(1, cols), None
        # One slice writes the result directly; several write partials that are summed below.
        out_shape = (n, m) if plan.splits == 1 else (plan.splits, n, m)
        out = torch.empty(out_shape, dtype=torch.float32, device=grad_out.device)
        _gather_wgrad_kernel[plan.grid](
            grad_out,
            x,
            rows,
            cols,
            out,
            T,
            n,
            m,
            plan.t_per_split,
            grad_out.stride(0),
            grad_out.stride(1),
            x.stride(0),
            x.stride(1),
            HAS_ROWS=rows is not None,
            HAS_COLS=cols is not None,
            # The Triton 3.x interpreter miscomputes tl.dot on bf16 operands; fp32 products of bf16
            # values are exact, so upcasting there changes nothing but speed.
            UPCAST=plan.upcast,
            PRECISION=plan.precision,
            BLOCK_N=plan.block_n,
            BLOCK_M=plan.block_m,
            BLOCK_T=plan.block_t,
            num_warps=4,
        )
        return out if plan.splits == 1 else out.sum(0)


@torch.library.custom_op("keystone_triton::gather_wgrad", mutates_args=())
def gather_wgrad_op(grad_out: Tensor, x: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``keystone_triton::gather_wgrad``: the launcher with default tuning (see the package docstring)."""
    return gather_wgrad(grad_out, x, rows, cols)


@gather_wgrad_op.register_fake
def _(grad_out, x, rows, cols):
    n = grad_out.shape[1] if rows is None else rows.shape[0]
    m = x.shape[1] if cols is None else cols.shape[0]
    return grad_out.new_empty((n, m), dtype=torch.float32)

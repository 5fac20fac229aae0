"""Scatter of fp32 keystone values into the frozen weight, in Triton.

The math, for a keystone tensor S [N, M] addressed by (rows, cols) of a frozen weight W::

    W[r(i), c(j)] = rne(S[i, j])      r(i) = rows[i] or i, c(j) = cols[j] or j

with ``rne`` the round-to-nearest-even cast into W's dtype; no other element of W is touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cast_rne, check_device, index_or_arange, on_device

__all__ = ["scatter_to_frozen", "scatter_to_frozen_op"]


@triton.jit
def _scatter_to_frozen_kernel(
    W,  # frozen weight [out, in], fp32 / bf16 / fp16, strides (stride_w0, stride_w1); written in place
    SRC,  # [N, M] fp32, contiguous
    ROWS,  # [N] int64, read only when HAS_ROWS
    COLS,  # [M] int64, read only when HAS_COLS
    N,
    M,
    stride_w0,
    stride_w1,
    HAS_ROWS: tl.constexpr,
    HAS_COLS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """W[r(i), c(j)] = rne(SRC[i, j]) for the [BLOCK_N, BLOCK_M] tile of this program."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask = mask_n[:, None] & mask_m[None, :]
    dst_n = index_or_arange(ROWS, offs_n, mask_n, HAS_ROWS)
    dst_m = index_or_arange(COLS, offs_m, mask_m, HAS_COLS)
    vals = tl.load(SRC + offs_n[:, None] * M + offs_m[None, :], mask=mask, other=0.0)
    w_ptrs = W + dst_n[:, None] * stride_w0 + dst_m[None, :] * stride_w1
    tl.store(w_ptrs, cast_rne(vals, W.dtype.element_ty), mask=mask)


def scatter_to_frozen(
    weight: Tensor,
    src: Tensor,
    rows: Tensor | None,
    cols: Tensor | None,
    *,
    block_n: int = 16,
    block_m: int = 128,
) -> None:
    """Launcher. weight [out, in] (fp32/bf16/fp16, any strides), src fp32 [N, M]; writes weight in place."""
    check_device("scatter_to_frozen", weight, src)
    n, m = src.shape
    if n == 0 or m == 0:
        return
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    with on_device(weight):
        _scatter_to_frozen_kernel[grid](
            weight,
            src.contiguous(),
            rows,
            cols,
            n,
            m,
            weight.stride(0),
            weight.stride(1),
            HAS_ROWS=rows is not None,
            HAS_COLS=cols is not None,
            BLOCK_N=block_n,
            BLOCK_M=block_m,
            num_warps=4,
        )


@torch.library.custom_op("keystone_triton::scatter_to_frozen", mutates_args={"weight"})
def scatter_to_frozen_op(weight: Tensor, src: Tensor, rows: Tensor | None, cols: Tensor | None) -> None:
    """``keystone_triton::scatter_to_frozen``: the launcher (see the package docstring)."""
    scatter_to_frozen(weight, src, rows, cols)


@scatter_to_frozen_op.register_fake
def _(weight, src, rows, cols):
    return None

"""Fused sparse AdamW + scatter over flat arenas, one Triton launch per frozen-weight dtype.

The math, per element of the arenas (torch.optim.AdamW, single-tensor path)::

    g = grad * gscale                              gscale = grad_scale, negated for maximize
    p = p * decay                                  decay = 1 - lr * wd
    m = m + w1 * (g - m)                           w1 = 1 - beta1 (torch's lerp; other form if w1 >= 0.5)
    v = v * beta2 + (1 - beta2) * g * g
    vmax = max(vmax, v)                            (amsgrad; vmax replaces v below)
    p = p + (-step_size) * m / (sqrt(v) / bc2_sqrt + eps)
    W_k[r(i), c(j)] = rne(p)                       step_size = lr / (1 - beta1^step),
                                                   bc2_sqrt = sqrt(1 - beta2^step)

One program per row of the layout's block table: BLOCK elements of one tensor, starting 64-byte
aligned (``tl.multiple_of``), loaded without a mask when the block is full (every block but a
tensor's last). The tables (segments, index, blocks) are built once by
:mod:`keystone_kernels.ops.layout` and live on the device, so a step copies nothing from the host.
With ``CAPTURABLE`` the per-step scalars are read from a device tensor, and a set ``skip`` makes
every program return before writing anything.

Called directly by the dispatcher (not a torch.library op): the optimizer step is not traced by
torch.compile, and the layout object carries the tables.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..layout import BLOCK, SEG_WIDTH, FlatLayout
from ._common import cast_rne, check_device, on_device

__all__ = ["fused_adamw_scatter"]

_CODE_TO_TL = {0: tl.float32, 1: tl.bfloat16, 2: tl.float16}


@triton.jit
def _load(PTR, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(PTR + offs, mask=mask, other=0.0)
    else:
        return tl.load(PTR + offs)


@triton.jit
def _store(PTR, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(PTR + offs, x, mask=mask)
    else:
        tl.store(PTR + offs, x)


@triton.jit
def _adamw_math(P, G, M, V, VMAX, offs, mask, decay, step_size, bc2_sqrt, gscale, w1, beta2, one_minus_beta2, eps,
                MASKED: tl.constexpr, AMSGRAD: tl.constexpr, SMALL_W1: tl.constexpr):
    """Update the arenas at ``offs`` (masked only in a tensor's last, partial block); return the new masters."""
    g = _load(G, offs, mask, MASKED) * gscale
    p = _load(P, offs, mask, MASKED) * decay
    m = _load(M, offs, mask, MASKED)
    v = _load(V, offs, mask, MASKED)
    # Fused multiply-adds exactly where torch's CPU kernels fuse (lerp_, addcmul_); the launch
    # disables automatic contraction elsewhere.
    if SMALL_W1:
        m = tl.fma(w1, g - m, m)
    else:
        m = tl.fma(-(g - m), 1.0 - w1, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    _store(M, offs, m, mask, MASKED)
    _store(V, offs, v, mask, MASKED)
    if AMSGRAD:
        v = tl.maximum(_load(VMAX, offs, mask, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        _store(VMAX, offs, v, mask, MASKED)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    _store(P, offs, p, mask, MASKED)
    return p


@triton.jit
def _fused_adamw_scatter_kernel(
    P,  # fp32 [numel] masters (the arenas are 1-D and share one layout)
    G,  # fp32 [numel] gradients
    M,  # fp32 [numel] exp_avg
    V,  # fp32 [numel] exp_avg_sq
    VMAX,  # fp32 [numel] max_exp_avg_sq, read only when AMSGRAD
    SEG,  # int64 [S, SEG_WIDTH] segments (layout.SEG_COLUMNS)
    INDEX,  # int64 [K] row / column indices of every tensor
    BLOCKS,  # int64 [B, 2] (segment, first element) per program
    SCAL,  # fp32 [5] decay, step_size, bc2_sqrt, gscale, skip; read only when CAPTURABLE
    block_base,  # first row of BLOCKS for this launch (blocks are grouped by target dtype)
    decay,  # the host scalars, used when not CAPTURABLE
    step_size,
    bc2_sqrt,
    gscale,
    w1,  # 1 - beta1
    beta2,
    one_minus_beta2,
    eps,
    SEG_W: tl.constexpr,  # SEG_WIDTH
    W_DTYPE: tl.constexpr,  # element type of every target of this launch
    SCATTER: tl.constexpr,  # False for tensors without a frozen target
    AMSGRAD: tl.constexpr,
    SMALL_W1: tl.constexpr,  # |w1| < 0.5: torch's lerp uses m + w1 (g - m), else g - (g - m)(1 - w1)
    CAPTURABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW on elements [start, start + BLOCK) of one tensor, then their scatter into its target."""
    if CAPTURABLE:
        if tl.load(SCAL + 4) != 0.0:
            return
        decay = tl.load(SCAL + 0)
        step_size = tl.load(SCAL + 1)
        bc2_sqrt = tl.load(SCAL + 2)
        gscale = tl.load(SCAL + 3)
    pid = tl.program_id(0).to(tl.int64) + block_base
    seg = tl.load(BLOCKS + 2 * pid)
    start = tl.load(BLOCKS + 2 * pid + 1)
    row = SEG + seg * SEG_W
    n = tl.load(row + 1)
    mcols = tl.load(row + 2)
    numel = n * mcols
    local = start + tl.arange(0, BLOCK)  # element index within the tensor
    offs = tl.multiple_of(tl.load(row + 0) + start, 16) + tl.arange(0, BLOCK)
    mask = local < numel
    if start + BLOCK <= numel:
        p = _adamw_math(P, G, M, V, VMAX, offs, mask, decay, step_size, bc2_sqrt, gscale, w1, beta2,
                        one_minus_beta2, eps, False, AMSGRAD, SMALL_W1)
    else:
        p = _adamw_math(P, G, M, V, VMAX, offs, mask, decay, step_size, bc2_sqrt, gscale, w1, beta2,
                        one_minus_beta2, eps, True, AMSGRAD, SMALL_W1)
    if SCATTER:
        rows_at = tl.load(row + 3)
        cols_at = tl.load(row + 4)
        ws0 = tl.load(row + 5)
        ws1 = tl.load(row + 6)
        w_ptr = tl.load(row + 7).to(tl.pointer_type(W_DTYPE))
        i = local // mcols
        j = local - i * mcols
        # Per-element copies of the "has indices" flags: a tensor mask, as the interpreter wants.
        has_rows = (tl.zeros_like(local) + rows_at) >= 0
        has_cols = (tl.zeros_like(local) + cols_at) >= 0
        r = tl.load(INDEX + rows_at + i, mask=mask & has_rows, other=0)
        c = tl.load(INDEX + cols_at + j, mask=mask & has_cols, other=0)
        r = tl.where(has_rows, r, i)
        c = tl.where(has_cols, c, j)
        tl.store(w_ptr + r * ws0 + c * ws1, cast_rne(p, W_DTYPE), mask=mask)


def fused_adamw_scatter(
    layout: FlatLayout,
    master: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    scalars: tuple[float, float, float, float] | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Launcher: one launch per target dtype of the layout (usually one, plus one for untargeted tensors)."""
    if not layout.dtype_ranges:
        return
    check_device("fused_adamw_scatter", master)
    capturable = isinstance(scalars, Tensor)
    host = (1.0, 0.0, 1.0, 1.0) if capturable else scalars
    w1 = 1.0 - beta1
    vmax = max_exp_avg_sq if max_exp_avg_sq is not None else master
    with on_device(master):
        for code, (first, end) in layout.dtype_ranges.items():
            _fused_adamw_scatter_kernel[(end - first,)](
                master, grad, exp_avg, exp_avg_sq, vmax, layout.segments, layout.index, layout.blocks,
                scalars if capturable else master, first, *host, w1, beta2, 1.0 - beta2, eps,
                SEG_W=SEG_WIDTH,
                W_DTYPE=_CODE_TO_TL.get(code, tl.float32),
                SCATTER=code >= 0,
                AMSGRAD=max_exp_avg_sq is not None,
                SMALL_W1=abs(w1) < 0.5,
                CAPTURABLE=capturable,
                BLOCK=BLOCK,
                num_warps=8,
                enable_fp_fusion=False,
            )

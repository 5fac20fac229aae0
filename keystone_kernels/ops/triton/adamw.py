"""Fused sparse AdamW + scatter over many keystone tensors in one Triton launch.

The math, per element of keystone tensor k (torch.optim.AdamW, single-tensor path)::

    g = grad * gscale                              gscale = grad_scale, negated for maximize
    p = p * decay                                  decay = 1 - lr_k * wd_k
    m = m + w1 * (g - m)                           w1 = 1 - beta1 (torch's lerp; other form if w1 >= 0.5)
    v = v * beta2 + (1 - beta2) * g * g
    vmax = max(vmax, v)                            (amsgrad; vmax replaces v below)
    p = p + (-step_size_k) * m / (sqrt(v) / bc2_sqrt_k + eps)
    W_k[r(i), c(j)] = rne(p)                       step_size_k = lr_k / (1 - beta1^step_k),
                                                   bc2_sqrt_k = sqrt(1 - beta2^step_k)

Multi-tensor: the launcher writes one int64 table (pointers, sizes, strides and per-tensor scalars
of every tensor, then a (tensor, first element) pair per block of BLOCK elements), copies it to
the device once, and launches one program per block, for all tensors together. Tensors whose
frozen weights differ in dtype go to separate launches (the store type is compile-time), so a
model with one weight dtype takes one launch.

Not a ``triton_op``: the table holds raw addresses, which fake tensors cannot provide, so the op
is an opaque ``torch.library.custom_op`` (torch.compile calls it, does not trace into it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cast_rne, check_device

__all__ = ["fused_adamw_scatter", "fused_adamw_scatter_op"]

# One tensor's row of the table, 16 int64 slots: addresses of p, g, m, v, vmax, W, rows, cols;
# n, mcols, W's strides, flags (1: rows given, 2: cols given); the fp32 bit patterns of decay,
# step_size and bc2_sqrt.
_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _fused_adamw_scatter_kernel(
    TABLE,  # int64: [num_tensors, 16] tensor rows (layout above), then [num_blocks, 2] (tensor, start)
    BLOCKS_OFFSET,  # where the block pairs start in TABLE (= 16 * num_tensors)
    gscale,  # grad_scale, negated for maximize
    w1,  # 1 - beta1
    beta2,
    one_minus_beta2,
    eps,
    W_DTYPE: tl.constexpr,  # element type of every frozen weight of this launch
    AMSGRAD: tl.constexpr,
    SMALL_W1: tl.constexpr,  # |w1| < 0.5: torch's lerp uses m + w1 (g - m), else g - (g - m)(1 - w1)
    ALIGNED: tl.constexpr,  # every fp32 pointer is 16-byte aligned: lets Triton use vector loads
    BLOCK: tl.constexpr,
):
    """One AdamW step on elements [start, start + BLOCK) of one tensor, then their scatter into W."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(TABLE + BLOCKS_OFFSET + 2 * pid)
    start = tl.load(TABLE + BLOCKS_OFFSET + 2 * pid + 1)
    row = TABLE + t * 16

    p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 5).to(tl.pointer_type(W_DTYPE))
    rows_ptr = tl.load(row + 6).to(tl.pointer_type(tl.int64))
    cols_ptr = tl.load(row + 7).to(tl.pointer_type(tl.int64))
    n = tl.load(row + 8)
    mcols = tl.load(row + 9)
    ws0 = tl.load(row + 10)
    ws1 = tl.load(row + 11)
    flags = tl.load(row + 12)
    decay = tl.load(row + 13).to(tl.int32).to(tl.float32, bitcast=True)
    step_size = tl.load(row + 14).to(tl.int32).to(tl.float32, bitcast=True)
    bc2_sqrt = tl.load(row + 15).to(tl.int32).to(tl.float32, bitcast=True)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < n * mcols
    g = tl.load(g_ptr + offs, mask=mask, other=0.0) * gscale
    p = tl.load(p_ptr + offs, mask=mask, other=0.0) * decay
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    # Fused multiply-adds exactly where torch's CPU kernels fuse (lerp_, addcmul_); the launch
    # disables automatic contraction elsewhere.
    if SMALL_W1:
        m = tl.fma(w1, g - m, m)
    else:
        m = tl.fma(-(g - m), 1.0 - w1, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        vmax_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)

    i = offs // mcols
    j = offs - i * mcols
    # Per-element copies of the flags: a tensor mask, as the interpreter wants for tl.load.
    has_rows = (tl.zeros_like(offs) + (flags & 1)) != 0
    has_cols = (tl.zeros_like(offs) + (flags & 2)) != 0
    r = tl.load(rows_ptr + i, mask=mask & has_rows, other=0)
    c = tl.load(cols_ptr + j, mask=mask & has_cols, other=0)
    r = tl.where(has_rows, r, i)
    c = tl.where(has_cols, c, j)
    tl.store(w_ptr + r * ws0 + c * ws1, cast_rne(p, W_DTYPE), mask=mask)


def _f32_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def fused_adamw_scatter(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    weights: list[Tensor],
    rows: list[Tensor | None],
    cols: list[Tensor | None],
    lrs: list[float],
    weight_decays: list[float],
    steps: list[int],
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: float,
    *,
    block: int = 1024,
) -> None:
    """Launcher: one launch per frozen-weight dtype covers every tensor (see the module docstring)."""
    if not params:
        return
    check_device("fused_adamw_scatter", *params, *weights)
    device = params[0].device
    groups: dict[torch.dtype, list[int]] = {}
    for k, p in enumerate(params):
        if p.numel():
            groups.setdefault(weights[k].dtype, []).append(k)
    w1 = 1.0 - beta1
    for wdtype, members in groups.items():
        table, blocks, aligned = [], [], True
        for slot, k in enumerate(members):
            p = params[k]
            vmax = max_exp_avg_sqs[k] if amsgrad else p
            fp32 = (p, grads[k], exp_avgs[k], exp_avg_sqs[k], vmax)
            aligned &= all(t.data_ptr() % 16 == 0 for t in fp32)
            r, c = rows[k], cols[k]
            step = float(steps[k])
            entry = [t.data_ptr() for t in fp32] + [
                weights[k].data_ptr(),
                r.data_ptr() if r is not None else p.data_ptr(),  # never read: flags say "all"
                c.data_ptr() if c is not None else p.data_ptr(),
                p.shape[0],
                p.shape[1],
                weights[k].stride(0),
                weights[k].stride(1),
                (r is not None) | ((c is not None) << 1),
                _f32_bits(1.0 - lrs[k] * weight_decays[k]),
                _f32_bits(lrs[k] / (1.0 - beta1**step)),
                _f32_bits(math.sqrt(1.0 - beta2**step)),
            ]
            table += entry
            blocks += [x for start in range(0, p.numel(), block) for x in (slot, start)]
        packed = torch.tensor(table + blocks, dtype=torch.int64).to(device, non_blocking=True)
        _fused_adamw_scatter_kernel[(len(blocks) // 2,)](
            packed,
            len(table),
            -grad_scale if maximize else grad_scale,
            w1,
            beta2,
            1.0 - beta2,
            eps,
            W_DTYPE=_TORCH_TO_TL[wdtype],
            AMSGRAD=amsgrad,
            SMALL_W1=abs(w1) < 0.5,
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=False,
        )


@torch.library.custom_op(
    "keystone_triton::fused_adamw_scatter",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "weights"),
)
def fused_adamw_scatter_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    weights: list[Tensor],
    rows: list[Tensor | None],
    cols: list[Tensor | None],
    lrs: list[float],
    weight_decays: list[float],
    steps: list[int],
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: float,
) -> None:
    """``keystone_triton::fused_adamw_scatter``: the launcher as an opaque custom op."""
    fused_adamw_scatter(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, weights, rows, cols, lrs,
                        weight_decays, steps, beta1, beta2, eps, amsgrad, maximize, grad_scale)


@fused_adamw_scatter_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, weights, rows, cols, lrs, weight_decays, steps,
      beta1, beta2, eps, amsgrad, maximize, grad_scale):
    return None

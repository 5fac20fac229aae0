"""Plain PyTorch implementations of the keystone ops: the oracle of every test and the fallback.

Index convention shared by every backend: ``rows`` / ``cols`` are 1-D int64 tensors (sorted,
unique) or ``None``, which means "all, in order". A keystone tensor addressed by ``(rows, cols)``
is the dense sub-matrix ``W[rows][:, cols]`` of a frozen weight ``W: [out, in]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gather_wgrad", "scatter_to_frozen", "fused_adamw_scatter", "adamw_update"]


def gather_wgrad(grad_out: Tensor, x: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``dW[rows][:, cols] = grad_out[:, rows]^T @ x[:, cols]``, fp32.

    grad_out: [T, out], x: [T, in] (fp32 / bf16 / fp16, same dtype). Returns fp32 [n, m] with
    n = len(rows) (or out) and m = len(cols) (or in). Inputs are gathered first and upcast to
    fp32, so nothing of size [out, in] exists unless rows and cols are both None.
    """
    g = grad_out if rows is None else grad_out.index_select(1, rows)
    xs = x if cols is None else x.index_select(1, cols)
    return torch.mm(g.t().float(), xs.float())


def scatter_to_frozen(weight: Tensor, src: Tensor, rows: Tensor | None, cols: Tensor | None) -> None:
    """In place: ``weight[rows[i], cols[j]] = src[i, j]`` rounded to nearest even into weight's dtype."""
    vals = src.to(weight.dtype)  # torch's float downcasts round to nearest even
    if rows is None and cols is None:
        weight.copy_(vals)
    elif rows is None:
        weight.index_copy_(1, cols, vals)
    elif cols is None:
        weight.index_copy_(0, rows, vals)
    else:
        weight.index_put_((rows[:, None], cols[None, :]), vals)


def fused_adamw_scatter(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    weights: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    steps: Sequence[int],
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: float,
) -> None:
    """One AdamW step per keystone tensor, then scatter of the new master into its frozen weight.

    The math of ``torch.optim.AdamW`` (single-tensor path), written with the same operations::

        g = grad * grad_scale            (negated when maximize)
        p = p * (1 - lr * wd)
        m = lerp(m, g, 1 - beta1)
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v)              (amsgrad only; vmax replaces v below)
        p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
        weight[rows, cols] = rne(p)

    with ``bc1 = 1 - beta1**step``, ``bc2 = 1 - beta2**step`` and ``step`` the 1-based number of
    this update (already incremented by the caller).
    """
    for i, p in enumerate(params):
        adamw_update(p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                     float(lrs[i]), float(weight_decays[i]), int(steps[i]), beta1, beta2, eps, maximize, grad_scale)
        scatter_to_frozen(weights[i], p, rows[i], cols[i])


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                 lr: float, weight_decay: float, step: int, beta1: float, beta2: float, eps: float,
                 maximize: bool = False, grad_scale: float = 1.0) -> None:
    """One in-place AdamW update of one tensor (the math above, without the scatter).

    ``max_exp_avg_sq`` is given for amsgrad and None otherwise. Also used by KeystoneAdamW for
    parameters that live outside a KeystoneLinear.
    """
    g = grad if grad_scale == 1.0 else grad * grad_scale
    if maximize:
        g = -g
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    p.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, v, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bc1)

"""Plain PyTorch implementations of the keystone ops: the oracle of every test and the fallback.

Index convention shared by every backend: ``rows`` / ``cols`` are 1-D int64 tensors (sorted,
unique) or ``None``, which means "all, in order". A keystone tensor addressed by ``(rows, cols)``
is the dense sub-matrix ``W[rows][:, cols]`` of a frozen weight ``W: [out, in]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import FlatLayout

__all__ = ["gather_wgrad", "scatter_to_frozen", "fused_adamw_scatter", "adamw_math"]


def gather_wgrad(grad_out: Tensor, x: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``dW[rows][:, cols] = grad_out[:, rows]^T @ x[:, cols]``, fp32.

    grad_out: [T, out], x: [T, in] (fp32 / bf16 / fp16, same dtype). Returns fp32 [n, m] with
    n = len(rows) (or out) and m = len(cols) (or in). Inputs are gathered first (and, off the
    tensor-core path below, upcast to fp32); the tensor-core path's only fp32 temporary is at most
    twice the result.
    """
    xs = x if cols is None else x.index_select(1, cols)
    if _MM_OUT_DTYPE and grad_out.dtype in (torch.bfloat16, torch.float16) and grad_out.device.type in ("cuda", "meta"):
        return _tensor_core_wgrad(grad_out, xs, rows)
    g = grad_out if rows is None else grad_out.index_select(1, rows)
    return torch.mm(g.t().float(), xs.float())


# torch.mm(a, b, out_dtype=torch.float32) for half-precision inputs: CUDA (and meta) kernels only.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _tensor_core_wgrad(grad_out: Tensor, xs: Tensor, rows: Tensor | None) -> Tensor:
    """CUDA, bf16 / fp16: one cuBLAS GEMM with fp32 accumulation and an fp32 result (``out_dtype``),
    the contract above without fp32 copies of the inputs. The products of half-precision values are
    exact in fp32, so only the summation order differs from the upcast path.

    ``rows`` covering at least half of ``out`` (the complement rows of a column block) is cheaper
    as the full ``[out, m]`` product then a row selection than as a ``[T, n]`` copy of ``grad_out``.
    Not yet run on a GPU (meta tensors check its shapes on the CPU); ``bench --device cuda`` times it
    as the ``reference`` weight-grad row.
    """
    if rows is None or 2 * rows.numel() >= grad_out.shape[1]:
        full = torch.mm(grad_out.t(), xs, out_dtype=torch.float32)
        return full if rows is None else full.index_select(0, rows)
    return torch.mm(grad_out.index_select(1, rows).t(), xs, out_dtype=torch.float32)


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


def fused_adamw_scatter(layout: FlatLayout, master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                        max_exp_avg_sq: Tensor | None, scalars: tuple[float, float, float, float] | Tensor,
                        beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step over the flat arenas, then the scatter of every tensor into its frozen target.

    The math of ``torch.optim.AdamW`` (single-tensor path), written with the same operations::

        g = grad * grad_scale            (grad_scale negated for maximize)
        p = p * decay                    (decay = 1 - lr * wd)
        m = lerp(m, g, 1 - beta1)
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v)              (amsgrad only; vmax replaces v below)
        p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
        target[rows, cols] = rne(p)

    ``scalars``: host floats ``(decay, step_size, bc2_sqrt, grad_scale)``, or a float32 ``[5]``
    tensor that adds ``skip`` (capturable steps: computed without reading any value on the host).
    """
    if isinstance(scalars, Tensor):
        _adamw_device_scalars(master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, beta1, beta2, eps)
    else:
        adamw_math(master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *scalars, beta1, beta2, eps)
    for k, target in enumerate(layout.targets):
        if target is not None:
            scatter_to_frozen(target.weight, layout.view(master, k), target.rows, target.cols)


def adamw_math(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
               decay: float, step_size: float, bc2_sqrt: float, grad_scale: float, beta1: float, beta2: float,
               eps: float) -> None:
    """One in-place AdamW update of one tensor (or arena) with host scalars (see fused_adamw_scatter)."""
    g = grad if grad_scale == 1.0 else grad * grad_scale
    p.mul_(decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, v, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def _adamw_device_scalars(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                          scalars: Tensor, beta1: float, beta2: float, eps: float) -> None:
    """adamw_math with the scalars in a device tensor; nothing changes where ``skip`` is set (no host sync)."""
    decay, step_size, bc2_sqrt, grad_scale, skip = scalars.unbind(0)
    keep = skip != 0
    g = grad * grad_scale
    new_p = p * decay
    new_m = exp_avg.lerp(g, 1.0 - beta1)
    new_v = (exp_avg_sq * beta2).addcmul_(g, g, value=1.0 - beta2)
    v = new_v
    if max_exp_avg_sq is not None:
        v = torch.maximum(max_exp_avg_sq, new_v)
        max_exp_avg_sq.copy_(torch.where(keep, max_exp_avg_sq, v))
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    new_p += (-step_size * new_m) / denom  # addcdiv_'s order on the host path: (value * m) / denom
    p.copy_(torch.where(keep, p, new_p))
    exp_avg.copy_(torch.where(keep, exp_avg, new_m))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, new_v))


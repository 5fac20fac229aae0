"""KeystoneAdamW: AdamW over keystone tensors only, fused with the scatter into the frozen weights.

``step()`` does bookkeeping (argument checks, lazy state under torch's key names ``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, gradient checks and clipping) and calls one fused
op per parameter group (:func:`keystone_kernels.ops.fused_adamw_scatter`): for every keystone
element it reads grad, m, v and the fp32 master, writes m, v and the master, and writes the
rounded master into the frozen weight of its :class:`KeystoneLinear`.

Parameters that do not belong to a KeystoneLinear (for instance norms a user chose to train) are
stepped with PyTorch's own AdamW math and nothing is scattered.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from . import ops
from .linear import KeystoneLinear
from .ops.reference import adamw_update

NONFINITE = ("raise", "skip")


def _scatter_target(p: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """(param view [n, m], frozen weight [out, in] or bias [out, 1], rows, cols) of a keystone tensor."""
    owner_ref = getattr(p, "_keystone_owner", None)
    owner: KeystoneLinear | None = owner_ref() if owner_ref is not None else None
    if owner is None:
        return None
    kind = p._keystone_kind
    if kind == "rows":
        return p, owner.frozen_weight, owner.rows, None
    if kind == "cols":
        return p, owner.frozen_weight, owner.col_rows, owner.cols
    return p.view(-1, 1), owner.frozen_bias.view(-1, 1), owner.rows, None


class KeystoneAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's math) stepping keystone tensors with one fused op per group.

    Args:
        params: ``keystone_parameters(model)`` or param groups (dicts with ``"params"`` and their own
            ``lr`` / ``weight_decay`` / ``betas`` / ``eps``).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        max_grad_norm: clip the global L2 norm of all gradients to this, folded into the step as a
            scale (None: no clipping). The norm before clipping is kept in ``last_grad_norm``.
        nonfinite: ``"raise"`` (default) a ValueError naming the tensor, or ``"skip"`` the step, when
            a gradient holds NaN or Inf; either way weights, states and step counts stay as they were.
        backend: op backend ("auto", "reference", "triton", "ext", or None for $KEYSTONE_BACKEND).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "raise",
        backend: str | None = "auto",
    ):
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        elif not 0.0 <= lr:
            raise ValueError(f"invalid learning rate: {lr} (must be >= 0)")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps: {eps} (must be >= 0)")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"invalid betas: {betas} (two values in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay: {weight_decay} (must be >= 0)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"invalid max_grad_norm: {max_grad_norm} (must be > 0, or None)")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.backend = backend
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"KeystoneAdamW steps fp32 master tensors; got a {p.dtype} parameter of shape {tuple(p.shape)}")

    def _grads(self) -> list[tuple[dict, Tensor, Tensor]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("KeystoneAdamW does not support sparse gradients")
                out.append((group, p, p.grad))
        return out

    def _check_and_norm(self, grads: list[Tensor]) -> float | None:
        """Global L2 norm when clipping, after checking every gradient is finite. None: skip this step."""
        if not grads:
            return 0.0
        norms = torch._foreach_norm(grads, 2.0)
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
        total_f = float(total)  # one device sync per step; the price of raising / skipping on NaN
        if not math.isfinite(total_f):
            if self.nonfinite == "skip":
                return None
            bad = next(i for i, n in enumerate(norms) if not torch.isfinite(n))
            raise ValueError(f"non-finite gradient (NaN or Inf) in keystone tensor {bad} of shape {tuple(grads[bad].shape)}; "
                             "the step was not taken (weights and optimizer state unchanged). "
                             "Pass nonfinite='skip' to skip such steps instead.")
        return total_f

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._grads()
        total = self._check_and_norm([g for _, _, g in entries])
        if total is None:
            self.skipped_steps += 1
            return loss
        self.last_grad_norm = total
        scale = 1.0
        if self.max_grad_norm is not None and total > self.max_grad_norm:
            scale = self.max_grad_norm / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        for group in self.param_groups:
            self._step_group(group, [(p, g) for grp, p, g in entries if grp is group], scale)
        return loss

    def _state_of(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict, pairs: list[tuple[Tensor, Tensor]], grad_scale: float) -> None:
        if not pairs:
            return
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        fused = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "weights", "rows", "cols", "steps")}
        plain = []
        for p, g in pairs:
            state = self._state_of(p, amsgrad)
            state["step"] += 1
            target = _scatter_target(p)
            if target is None:
                plain.append((p, g, state))
                continue
            view, weight, rows, cols = target
            shape = view.shape
            fused["params"].append(view)
            fused["grads"].append(g.view(shape))
            fused["exp_avgs"].append(state["exp_avg"].view(shape))
            fused["exp_avg_sqs"].append(state["exp_avg_sq"].view(shape))
            fused["max_exp_avg_sqs"].append(state["max_exp_avg_sq"].view(shape) if amsgrad else None)
            fused["weights"].append(weight)
            fused["rows"].append(rows)
            fused["cols"].append(cols)
            fused["steps"].append(int(state["step"]))
        if fused["params"]:
            ops.fused_adamw_scatter(
                fused["params"], fused["grads"], fused["exp_avgs"], fused["exp_avg_sqs"],
                fused["weights"], fused["rows"], fused["cols"],
                lr=lr, weight_decay=group["weight_decay"], step=fused["steps"], beta1=beta1, beta2=beta2,
                eps=group["eps"], max_exp_avg_sqs=fused["max_exp_avg_sqs"] if amsgrad else None,
                amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, backend=self.backend,
            )
        for p, g, state in plain:  # same math, no scatter
            adamw_update(p, g, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq") if amsgrad else None,
                         lr, group["weight_decay"], int(state["step"]), beta1, beta2, group["eps"], maximize, grad_scale)

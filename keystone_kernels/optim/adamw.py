"""KeystoneAdamW: AdamW over keystone tensors only, fused with the scatter into the frozen weights.

The keystone tensors of a param group (per device) live in flat fp32 arenas: the parameters,
their ``.grad`` and their optimizer state (torch's key names ``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) are views into one master, one gradient and one arena per
moment. A :class:`~keystone_kernels.ops.layout.FlatLayout`, built on the first step, says where
each tensor's elements go in its frozen weight. A step is then, per group: one norm of the
gradient arena (non-finite check, clipping), and one fused op that updates the arenas and
scatters the rounded masters into the frozen weights. The host work of a step does not grow with
the number of tensors (docs/design.md, "The optimizer step").

The layout is rebuilt only when it may be stale: a new param group, ``load_state_dict``, or one of
*its* KeystoneLinear layers moved (``.to()``), merged, freed, given a new frozen weight
(``load_state_dict(assign=True)``, ``layer.frozen_weight = t``) or a new keystone tensor (each
layer tells the optimizers that point into it; a change of another model does not count).
``KEYSTONE_CHECK_LAYOUT=1`` re-checks it on every step, for debugging.

**Compiled and captured steps.** Building the layout reads data pointers, which a trace cannot:
call :meth:`KeystoneAdamW.build_layout` (or run one eager step) before ``torch.compile(opt.step)``
or a CUDA graph capture. From the first compiled or captured step on, a rebuild is refused with
an error that says what to do, because a compiled or captured step keeps the arenas it saw. In
capturable mode a float lr becomes a 0-dim float64 device tensor when the layout is built, so a
scheduler's change (torch's schedulers ``fill_`` a tensor lr in place) reaches a captured step.

A tensor with ``requires_grad=False`` (``peft.get_peft_model`` and ``model.requires_grad_(False)``
set it on keystone tensors) would never get a gradient, so the optimizer would silently train
nothing. It is refused, without per-tensor work in a steady-state step: when the layout is built
(the first step, and after each rebuild), on a step where no tensor has a gradient, on a
non-capturable step whose gradient norm is exactly zero (what a step sees when every tensor was
frozen after the layout was built), and on every step under ``KEYSTONE_CHECK_LAYOUT=1``. Not
caught until then: one tensor of many frozen after the first step.

Parameters that do not belong to a KeystoneLinear (for instance norms a user chose to train) live
in the same arenas and get the same update; nothing is scattered for them.

torch.optim's rules where users rely on them: a tensor whose ``.grad`` is None at ``step()`` is not
stepped (no moment update, no step count), and a step after ``zero_grad()`` with no backward in
between changes nothing. Tensors with different step counts live in different buckets (one fused op
each). ``state_dict()`` records each tensor's keystone rows and columns, and ``load_state_dict``
refuses, naming the field, a state of another mask or one that cannot be trusted (missing keys,
wrong types, non-finite values, negative second moments).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter, is_

import torch
import torch.distributed as dist
from torch import Tensor

from ..nn.parameter import KIND_ATTRS, kind_of, owner_of, rebind_data, tagged_owner, watch_layout
from ..ops.dispatch import fused_adamw_scatter_unchecked
from ..ops.layout import FlatLayout, Target, build_flat_layout, host_scalars
from ..state import trainable_parameters
from ..utils.dist import replica_group
from ..utils.dtensor import is_dtensor
from .state_checks import (
    LAYOUT_KEY,
    check_saved_group,
    check_saved_layout,
    check_saved_tensor_state,
    describe,
    tensor_name,
)

NONFINITE = ("defer", "raise", "skip")
_CAPTURE_BEFORE_LAYOUT = (
    "KeystoneAdamW's step is being captured in a CUDA graph, but its flat layout must be built first ({reason}): "
    "building it allocates the arenas and reads data pointers, which a capture cannot. Call opt.build_layout() (or "
    "run one eager step) before capturing.")
_NOT_TRACEABLE = (
    "KeystoneAdamW.step() runs eagerly, outside torch.compile: it checks every keystone tensor's .grad on the "
    "host, which dynamo cannot trace for a Parameter subclass. For a compiled step, build the optimizer with "
    "KeystoneAdamW(..., capturable=True, compile_step=True): it compiles all the step's device work in one graph "
    "(and compile the model itself, not opt.step). With fullgraph=False, torch.compile runs this step eagerly.")
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_grad_of = attrgetter("grad")


def _refuse_dtensor(p: Tensor) -> None:
    if is_dtensor(p):
        raise ValueError(
            f"KeystoneAdamW got a DTensor parameter of shape {tuple(p.shape)} (placements {p.placements}): a sharded "
            "keystone tensor cannot be scattered into its frozen weight, so it would train nothing. Shard the model "
            "with keystone_kernels.fully_shard(model), which keeps keystone tensors whole on every rank, and build the "
            "optimizer from keystone_parameters(model) afterwards.")


def _step_hyperparameters(group: dict, read_tensor_lr: bool) -> tuple[float, float, float, float | None]:
    """``(beta1, beta2, eps, lr)`` of a param group, checked at every step: a group added or edited after
    construction never went through ``__init__``'s checks, and the fused op takes them unchecked.

    ``lr`` is None for a tensor lr unless ``read_tensor_lr`` (reading it syncs; a capturable step may not).
    """
    beta1, beta2 = group["betas"]
    eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
    if isinstance(lr, Tensor):
        lr = float(lr) if read_tensor_lr else None
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and 0.0 <= eps < math.inf):
        raise ValueError(f"param group with betas {tuple(group['betas'])} and eps {eps}: betas must be in [0, 1) and "
                         "eps >= 0 (the step was not taken: weights and optimizer state unchanged)")
    for name, value in (("lr", lr), ("weight_decay", wd)):
        if value is not None and not 0.0 <= value < math.inf:
            raise ValueError(f"param group with {name} {value}: {name} must be finite and >= 0 (set after "
                             "construction, or by a scheduler?); the step was not taken: weights and optimizer state "
                             "unchanged")
    return float(beta1), float(beta2), float(eps), (None if lr is None else float(lr))


def _global_norm(buckets: list) -> Tensor:
    """The L2 norm of every gradient arena together (a 0-dim fp32 tensor on the first bucket's device)."""
    norms = [torch.linalg.vector_norm(b.grad) for b in buckets]
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _check_trainable(params: Iterable[Tensor]) -> None:
    """Raise for the first tensor with ``requires_grad=False``: autograd never gives it a gradient."""
    for k, p in enumerate(params):
        if not p.requires_grad:
            kind, owner = kind_of(p), tagged_owner(p)
            what = (f"the keystone {KIND_ATTRS[kind]} tensor of shape {tuple(p.shape)} of {owner!r}" if kind and owner
                    else f"tensor {k} of shape {tuple(p.shape)}")
            raise ValueError(
                f"KeystoneAdamW got {what} with requires_grad=False: autograd never computes its gradient, so it would "
                "train nothing. Something froze it after patching (peft.get_peft_model(model, ...) and "
                "model.requires_grad_(False) do). Make it trainable again, e.g. `for p in keystone_parameters(model): "
                "p.requires_grad_(True)`, or build the PeftModel first and patch it "
                "(keystone_kernels.patch(peft_model, mask) keeps both sets trainable), "
                "or leave the tensor out of the optimizer.")


def _scatter_target(p: Tensor, watcher=None) -> tuple[tuple[int, int], Target | None]:
    """(2-D shape of p in its arena, where its values go in the frozen weight or None).

    ``watcher`` (the optimizer building its layout) is told of later changes of p's layer.
    """
    _refuse_dtensor(p)
    found = owner_of(p)  # raises for a tensor whose layer was merged / freed / replaced it
    if found is None:
        return (1, p.numel()), None
    owner, kind = found
    if watcher is not None:
        watch_layout(owner, watcher)
    write = next(w for w in owner.writes() if w.kind == kind)
    shape = tuple(write.source().shape)
    if owner.sharded:
        return shape, None  # FSDP2: the bucket's ReplicaSync writes this rank's rows after the fused update
    return shape, Target(owner.frozen_2d(write), write.rows, write.cols)


class ReplicaSync:
    """What one bucket of replicated tensors adds to a step on a model sharded by ``fully_shard``.

    ``reduce(grad)``: one all-reduce of the flat gradient arena over the group, divided by its size
    (the mean over ranks, as DDP computes it). ``scatter()``: after the fused update (which scatters
    nothing for sharded layers), each sharded layer writes the rows of its rank's part
    (``KeystoneLinear.sync_frozen``).
    """

    def __init__(self, group, layers: list):
        self.group, self.layers = group, layers

    def reduce(self, grad: Tensor) -> None:
        dist.all_reduce(grad, group=self.group)
        grad.div_(dist.get_world_size(self.group))

    def scatter(self) -> None:
        for layer in self.layers:
            layer.sync_frozen()


def _bucket_sync(params: list[Tensor]) -> ReplicaSync | None:
    """The :class:`ReplicaSync` of a bucket, or None when no tensor of it is replicated by ``fully_shard``.

    Raises ValueError when a bucket mixes replicated tensors with others, or tensors of two groups.
    """
    tags = [replica_group(p) for p in params]
    groups = {id(t.group if t is not None else None): (t.group if t is not None else None) for t in tags}
    if list(groups) == [id(None)]:
        return None
    if len(groups) > 1:
        raise ValueError("a KeystoneAdamW param group mixes tensors of a model sharded by keystone_kernels.fully_shard "
                         "with other tensors (or tensors of two sharded models); give each model its own optimizer")
    layers = {}
    for p in params:
        found = owner_of(p)
        if found is not None and found[0].sharded:
            layers[id(found[0])] = found[0]
    return ReplicaSync(next(iter(groups.values())), list(layers.values()))


@dataclass
class _Pending:
    """A deferred step whose verdict the host has not read: ``verdict`` [norm, skipped] (a pinned host copy on
    CUDA, written by an async copy that ``done`` marks), and the buckets whose counts it advanced."""

    verdict: Tensor
    done: torch.cuda.Event | None
    buckets: list[_Bucket]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without a sync: from pinned memory, asynchronously, on CUDA."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _Bucket:
    """The tensors of one param group on one device: flat arenas, their views, the layout, the step count."""

    def __init__(self, group: dict, params: list[Tensor], layout: FlatLayout, arenas: dict[str, Tensor],
                 grad_views: list[Tensor], step: Tensor, sync=None, count: int = 0):
        self.group, self.params, self.layout, self.grad_views, self.step = group, params, layout, grad_views, step
        self.count = count  # the step count as a Python int (the default mode's host scalars read it, not ``step``)
        self.sync = sync  # a ReplicaSync on a model sharded by keystone_kernels.fully_shard, else None
        self.master, self.grad = arenas["master"], arenas["grad"]
        self.exp_avg, self.exp_avg_sq = arenas["exp_avg"], arenas["exp_avg_sq"]
        self.max_exp_avg_sq = arenas.get("max_exp_avg_sq")
        self.one = torch.ones((), dtype=torch.float32, device=step.device)  # the clip scale without clipping
        self.zeroed_version: int | None = None  # the gradient arena's autograd version right after zero_grad()

    def collect_grads(self) -> bool | list[bool]:
        """Make every ``p.grad`` its view of the gradient arena. True: every tensor has a gradient;
        False: none has; else one flag per tensor (some grads are None: those are not stepped).

        The fast path is one identity scan in C (``map``), no Python per tensor: backward accumulates
        into the views in place, which moves the arena's version counter, so an arena whose version is
        still the one ``zero_grad()`` left has received no gradient (a step without backward). A
        gradient that was replaced (``p.grad = g``, or ``model.zero_grad()`` then backward) is copied
        in; a tensor whose grad is None is not stepped, as in torch.optim.
        """
        if torch.compiler.is_compiling():  # dynamo cannot trace attrgetter; it unrolls this loop instead
            same = all(p.grad is view for p, view in zip(self.params, self.grad_views))
        else:
            same = all(map(is_, map(_grad_of, self.params), self.grad_views))
        if same:
            return self.grad._version != self.zeroed_version
        has = []
        for p, view in zip(self.params, self.grad_views):
            g = p.grad
            if g is not None and g is not view:
                if g.is_sparse:
                    raise ValueError("KeystoneAdamW does not support sparse gradients")
                view.copy_(g.view(view.shape))
                p.grad = view
            has.append(g is not None)
        return True if all(has) else (False if not any(has) else has)

    def check(self) -> None:
        """KEYSTONE_CHECK_LAYOUT=1: every parameter still a view of the arena and trainable, every target in place."""
        _check_trainable(self.params)
        for k, p in enumerate(self.params):
            if p.data_ptr() != self.layout.view(self.master, k).data_ptr():
                raise RuntimeError(f"keystone layout is stale: tensor {k} of shape {tuple(p.shape)} no longer lives "
                                   "in the optimizer's arena (was p.data replaced?)")
            _, target = _scatter_target(p)
            old = self.layout.targets[k]
            if ((target is None) != (old is None)
                    or (target is not None and target.weight.data_ptr() != old.weight.data_ptr())):
                raise RuntimeError(f"keystone layout is stale: the frozen weight of tensor {k} moved")


class KeystoneAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's math) over flat arenas, one fused op per group, device and step count.

    Args:
        params: ``keystone_parameters(model)`` or param groups (dicts with ``"params"`` and their own
            ``lr`` / ``weight_decay`` / ``betas`` / ``eps``). Every tensor must be float32.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``; ``lr`` may be a
            0-dim tensor (read on the device in capturable mode).
        max_grad_norm: clip the global L2 norm of all gradients to this, folded into the step as a
            scale (None: no clipping). The norm before clipping is kept in ``last_grad_norm``.
        nonfinite: what a step does when a gradient holds NaN or Inf (or finite values whose norm
            overflows fp32): the step is never taken (weights, state and step counts stay as they
            were), and ``"defer"`` (the default) raises a ValueError at the next ``step()``: the
            device decides to skip, and the host reads that verdict one step late, so a step never
            waits on the device; ``"raise"`` raises in the same step and names the tensor, at the
            cost of one host sync per step; ``"skip"`` skips and counts (``skipped_steps``) without
            a sync. Capturable mode allows "skip" only (its default).
        capturable: never read a device value on the host in ``step()`` (torch's name): the step
            count lives on the device, and the norm, clip scale and skip decision are computed there
            and consumed by the kernel, so a step can be captured in a CUDA graph. ``last_grad_norm``
            and ``skipped_steps_tensor`` are then device tensors, and a float lr becomes a float64
            device tensor when the layout is built (schedulers fill it in place).
        compile_step: with ``capturable``, run the step's device work (norm, clip scale, skip
            decision, bias corrections and the fused update) as one ``torch.compile(fullgraph=True)``
            graph, built on the first step; a dict gives torch.compile's options (``{"mode":
            "reduce-overhead"}``). The host checks of the step (which tensors have gradients, the
            hyperparameters) stay eager: ``torch.compile(opt.step)`` cannot trace them and runs the
            step eagerly.
        backend: op backend ("auto", "reference", "triton", "ext", or None for $KEYSTONE_BACKEND).

    Gradients live in a flat buffer too: ``p.grad`` is a view that backward accumulates into, and
    ``zero_grad()`` zeroes the buffer instead of setting grads to None (so that backward never
    allocates). A ``step()`` with no backward since ``zero_grad()`` changes nothing, and a tensor
    whose ``.grad`` is None is not stepped, as in torch.optim. One difference remains: after this
    optimizer's ``zero_grad()``, a tensor that no backward reached while others were reached reads
    as a zero gradient and is stepped (its moments decay, weight decay applies), as under DDP's
    ``gradient_as_bucket_view``; ``model.zero_grad()`` (grads set to None) gives torch's rule there.
    """

    writes_frozen_weights = True  # the step scatters into the frozen weights: keystone_kernels' step hooks skip it

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
        nonfinite: str | None = None,
        capturable: bool = False,
        compile_step: bool | dict = False,
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
        if nonfinite is None:
            nonfinite = "skip" if capturable else "defer"
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if compile_step and not capturable:
            raise ValueError("compile_step=True compiles the capturable step (a step that reads the gradient norm on "
                             "the host cannot be one graph): pass capturable=True as well")
        if capturable and nonfinite == "raise":
            raise ValueError("nonfinite='raise' needs the host to read the gradient norm, which capturable=True "
                             "forbids: use nonfinite='skip' (non-finite steps are skipped on the device and counted "
                             "in skipped_steps_tensor), or capturable=False")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, capturable=bool(capturable))
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.capturable = bool(capturable)
        self.compile_step = compile_step
        self._compiled_update = None
        self._eager_only_step = None
        if "torch._dynamo" in sys.modules:  # a process that compiles: ready for torch.compile(opt.step)
            self._make_eager_only_step()
        self.backend = backend
        self._last_grad_norm: float | Tensor | None = None
        self._skipped = 0
        self._skipped_t: Tensor | None = None
        self._pending: _Pending | None = None  # a deferred step whose verdict the host has not read yet
        self._deferred_error: str | None = None  # what the next step() raises
        self._buckets: list[_Bucket] | None = None
        self._stale: str | None = "it was never built"  # why the layout must be rebuilt, None while it is current
        self._frozen_by: str | None = None  # "compiled" / "captured in a CUDA graph": no rebuild from then on
        for group in self.param_groups:
            for p in group["params"]:
                _refuse_dtensor(p)
                if p.dtype != torch.float32:
                    raise ValueError(f"KeystoneAdamW steps fp32 master tensors; got a {p.dtype} parameter of shape "
                                     f"{tuple(p.shape)}")

    @classmethod
    def for_model(cls, model: torch.nn.Module, no_decay: Callable[[Tensor], bool] | None = None,
                  **settings) -> KeystoneAdamW:
        """The optimizer over everything a patched model trains (its keystone tensors, and the dense parameters of
        ``patch(also_train=...)``), with ``settings`` as the constructor takes them. The one place the library
        builds it.

        ``no_decay``: the tensors it picks form a second param group with ``weight_decay=0`` (as transformers'
        Trainer leaves norms and biases undecayed); the others form the first, with ``settings``'
        ``weight_decay`` (the constructor's default when not given), and an empty group is left out.
        """
        params = trainable_parameters(model)
        if no_decay is None:
            return cls(params, **settings)
        decay = {"params": [p for p in params if not no_decay(p)]}
        if "weight_decay" in settings:
            decay["weight_decay"] = settings.pop("weight_decay")
        groups = [decay, {"params": [p for p in params if no_decay(p)], "weight_decay": 0.0}]
        return cls([g for g in groups if g["params"]], **settings)

    # ------------------------------------------------------------------ torch.optim contract

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.layout_changed("a param group was added")  # the new tensors need a place in the arenas

    def state_dict(self) -> dict:
        """torch's ``{"state", "param_groups"}`` plus ``"keystone_layout"``: each tensor's kind, shape and its
        layer's keystone rows and columns, so that a state of another mask is refused at load."""
        self._settle()  # the step counts of a skipped deferred step are taken back first
        out = super().state_dict()
        out[LAYOUT_KEY] = [describe(p) for g in self.param_groups for p in g["params"]]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, after :meth:`_check_state` (nothing changes when it raises)."""
        self._check_state(state_dict)
        self._settle()
        super().load_state_dict({k: v for k, v in state_dict.items() if k != LAYOUT_KEY})
        self.layout_changed("load_state_dict replaced its state")  # copied into fresh arenas on the next step

    def _check_state(self, state_dict: dict) -> None:
        """Refuse, before anything changes and naming the field, a state that cannot be trusted: saved for
        other tensors (another mask: rows and columns are compared, not only shapes), with missing keys,
        wrong types, non-finite values or negative second moments, or invalid hyperparameters."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) \
                or not isinstance(state_dict.get("state"), dict):
            raise ValueError("not an optimizer state dict: expected a dict with a 'state' dict and a 'param_groups' "
                             f"list, got {type(state_dict).__name__} with keys "
                             f"{sorted(map(str, state_dict)) if isinstance(state_dict, dict) else '-'}")
        saved_groups = state_dict["param_groups"]
        for i, group in enumerate(saved_groups):
            check_saved_group(i, group)
        params = [p for g in self.param_groups for p in g["params"]]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            return  # torch's own check names this case
        if LAYOUT_KEY in state_dict:
            check_saved_layout(params, state_dict[LAYOUT_KEY])
        state = state_dict["state"]
        k = 0
        for group in saved_groups:
            for i in group["params"]:
                if i in state:
                    p = params[k]
                    check_saved_tensor_state(f"the saved state of {tensor_name(k, p)}", state[i], tuple(p.shape),
                                              bool(group.get("amsgrad", False)))
                k += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers (the grads stay views of them; see the class docstring)."""
        if self._buckets is None or self._stale is not None:
            return super().zero_grad(set_to_none)
        for b in self._buckets:
            b.grad.zero_()
            if not all(map(is_, map(_grad_of, b.params), b.grad_views)):
                for p, view in zip(b.params, b.grad_views):
                    p.grad = view
            b.zeroed_version = b.grad._version  # a step before the next backward sees it unchanged and skips

    @property
    def last_grad_norm(self) -> float | Tensor | None:
        """Global gradient norm of the last step before clipping (a device tensor when capturable; in the default
        mode reading it waits for the last step's verdict)."""
        self._settle()
        return self._last_grad_norm

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it syncs once when capturable, and waits for the last
        step's verdict in the default mode)."""
        self._settle()
        return int(self._skipped_t) if self.capturable and self._skipped_t is not None else self._skipped

    @property
    def skipped_steps_tensor(self) -> Tensor | None:
        """Capturable mode: the device counter behind ``skipped_steps``."""
        return self._skipped_t

    # ------------------------------------------------------------------ the flat layout

    def layout_changed(self, reason: str) -> None:
        """Told by a layer of this optimizer (or by itself) that the flat layout is stale: rebuild before the
        next step. ``reason`` ends up in the error a compiled or captured optimizer raises."""
        if getattr(self, "_stale", None) is None:  # (torch's __init__ adds the first groups before ours runs)
            self._stale = reason

    def build_layout(self) -> None:
        """Build (or rebuild) the flat arenas now, moving every tensor, its grad and its state into them.

        The first eager step does this itself. Call it before compiling ``opt.step`` or capturing it in a
        CUDA graph (a trace cannot read the data pointers the layout needs), and after a change the
        compiled or captured step refused (then compile again with ``torch.compiler.reset()``, or
        capture again). Eager only.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError("KeystoneAdamW.build_layout() cannot run inside a compiled region: call it before "
                               "compiling the step")
        self._settle()  # its buckets are about to go
        self._frozen_by = None
        self._compiled_update = None  # a compiled step traced the old arenas: trace the new ones
        self._buckets = None
        self._buckets = [b for group in self.param_groups for b in self._build_buckets(group, group["params"])]
        self._stale = None

    def _layout(self) -> list[_Bucket]:
        if self._stale is not None:
            if self._frozen_by is not None:
                raise RuntimeError(
                    f"KeystoneAdamW's flat layout is stale ({self._stale}) after its step was {self._frozen_by}. "
                    f"Rebuilding it would move every tensor into new arenas while the {self._frozen_by} step keeps "
                    "the old ones (freed memory, under a CUDA graph), so it is refused. Call opt.build_layout() "
                    "eagerly, then compile again (torch.compiler.reset()) or capture the step again; or build a new "
                    "optimizer (carry the state over with state_dict() / load_state_dict()).")
            self.build_layout()
        elif os.environ.get("KEYSTONE_CHECK_LAYOUT", "0") not in ("", "0") and not torch.compiler.is_compiling():
            for b in self._buckets:
                b.check()
        return self._buckets

    def _enter_captured_step(self) -> None:
        """A step under a CUDA graph capture: the layout must exist, and stays fixed from now on."""
        if not (self.capturable and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        if self._stale is not None and self._frozen_by is None:
            raise RuntimeError(_CAPTURE_BEFORE_LAYOUT.format(reason=self._stale))
        self._frozen_by = self._frozen_by or "captured in a CUDA graph"

    @torch.no_grad()
    def _build_buckets(self, group: dict, params: list[Tensor]) -> list[_Bucket]:
        """Move tensors of ``group``, with their grads and state, into fresh arenas, one bucket per (device,
        step count); validate targets once."""
        by_key: dict[tuple[torch.device, float], list[Tensor]] = {}
        _check_trainable(params)
        for p in params:
            if p.dtype != torch.float32:
                raise ValueError(f"KeystoneAdamW steps fp32 master tensors; a parameter of shape {tuple(p.shape)} "
                                 f"is now {p.dtype} (was the model cast with .half() / .to(dtype)?)")
            state = self.state[p]
            by_key.setdefault((p.device, float(state["step"]) if state else 0.0), []).append(p)
        if self.capturable and by_key and not isinstance(group["lr"], Tensor):
            # a device tensor that schedulers fill in place: a captured step reads each new value
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64, device=next(iter(by_key))[0])
        buckets = []
        for (device, step_count), params in by_key.items():
            shapes, targets = zip(*[_scatter_target(p, self) for p in params])
            layout = build_flat_layout(list(shapes), list(targets), device)
            amsgrad = group["amsgrad"]
            names = ["master", "grad", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
            arenas = {name: torch.zeros(layout.numel, dtype=torch.float32, device=device) for name in names}
            grad_views = []
            for k, p in enumerate(params):
                state = self.state[p]
                for name in ("master", "grad") + _STATE_KEYS:
                    if name not in arenas:
                        continue
                    view = layout.view(arenas[name], k).view(p.shape)
                    if name == "grad" and p.grad is not None and p.grad.is_sparse:
                        raise ValueError("KeystoneAdamW does not support sparse gradients")
                    source = {"master": p.detach(), "grad": p.grad}.get(name, state.get(name))
                    if source is not None:
                        view.copy_(source.view(p.shape))
                    if name == "master":
                        rebind_data(p, view)  # same values: not an edit the layer must re-scatter
                    elif name == "grad":
                        grad_views.append(view)
                        if source is not None:  # a missing grad stays None: a step before any backward skips
                            p.grad = view
                    else:
                        state[name] = view
            step_device = device if self.capturable else "cpu"
            step = torch.tensor(step_count, dtype=torch.float32, device=step_device)
            for p in params:
                self.state[p]["step"] = step  # one tensor per group, shared: torch's key, O(1) to advance
            sync = _bucket_sync(params)
            buckets.append(_Bucket(group, params, layout, arenas, grad_views, step, sync, int(step_count)))
        return buckets

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        if torch.compiler.is_compiling():  # torch.compile(opt.step)
            if self._eager_only_step is None:
                raise RuntimeError(_NOT_TRACEABLE)  # dynamo then runs this frame eagerly
            return self._eager_only_step(closure)
        loss = self._eager_step(closure)
        if self._eager_only_step is None and "torch._dynamo" in sys.modules:
            self._make_eager_only_step()
        return loss

    def _make_eager_only_step(self) -> None:
        """The step with dynamo disabled in it and in everything it calls (``recursive``), for a traced
        ``opt.step``: otherwise dynamo compiles each callee frame on its own, each a slow first step, and
        guards on weak dictionaries that the garbage collector changes (an IndexError in a guard, seen).
        Made only once torch._dynamo is loaded: importing it is a cost measured once, see docs/design.md
        (section 6), and only a process that compiles loads it. A disabled function cannot be made inside a
        traced frame."""
        self._eager_only_step = torch.compiler.disable(self._eager_step, recursive=True, reason=_NOT_TRACEABLE)

    def _eager_step(self, closure=None):
        self._settle()
        if self._deferred_error is not None:  # the verdict of the last step, read one step late
            error, self._deferred_error = self._deferred_error, None
            raise ValueError(error)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._enter_captured_step()
        buckets = self._layout()
        active = []
        for b, has in [(b, b.collect_grads()) for b in buckets]:
            if has is True:
                active.append(b)
            elif has is not False:  # some grads are None: those tensors move to a bucket of their own
                active.append(self._split(b, has))
        if not active:
            for b in buckets:  # no gradient anywhere: a step before any backward, or frozen tensors
                _check_trainable(b.params)
            return loss
        hyper = [_step_hyperparameters(b.group, not self.capturable) for b in active]  # before anything changes
        for b in active:
            if b.sync is not None:
                b.sync.reduce(b.grad)  # sharded model: one all-reduce of the flat gradient arena
        if self.capturable:
            lrs = [self._device_lr(b.group, b.step.device) for b in active]
            if self._skipped_t is None:
                self._skipped_t = torch.zeros((), dtype=torch.float32, device=active[0].step.device)
            self._last_grad_norm = self._device_update()(active, hyper, lrs)
            for b in active:
                if b.sync is not None:
                    b.sync.scatter()  # a skipped step rewrites the unchanged values: harmless
        elif self.nonfinite == "raise":
            self._step_from_host(active, hyper, _global_norm(active))
        else:
            self._step_deferred(active, hyper)
        return loss

    def _device_update(self):
        """The function that runs a capturable step's device work: :meth:`_step_on_device`, or its
        ``torch.compile`` (``fullgraph=True``, the options of ``compile_step``), built on first use."""
        if not self.compile_step:
            return self._step_on_device
        if self._compiled_update is None:
            options = self.compile_step if isinstance(self.compile_step, dict) else {}
            self._compiled_update = torch.compile(self._step_on_device, **{"fullgraph": True, **options})
        self._frozen_by = self._frozen_by or "compiled"
        return self._compiled_update

    def _split(self, b: _Bucket, has: list[bool]) -> _Bucket:
        """Replace bucket ``b`` by one of its tensors with a gradient (returned) and one of those without.

        Their step counts differ from now on, so they stay apart; O(tensors) once, on the rare step where
        some grads are None and others are not. Refused once the step was compiled or captured (new arenas).
        """
        if self._frozen_by is not None:
            raise RuntimeError(
                f"some keystone tensors of a param group have no gradient (.grad is None) in a step that was "
                f"{self._frozen_by}: stepping only the others needs new arenas, which a {self._frozen_by} step "
                "cannot follow. Give every tensor a gradient (the optimizer's zero_grad() keeps them as zeros), or "
                "put the tensors that get none in an optimizer of their own.")
        i = self._buckets.index(b)
        with_grad = [p for p, h in zip(b.params, has) if h]
        without = [p for p, h in zip(b.params, has) if not h]
        new = self._build_buckets(b.group, with_grad) + self._build_buckets(b.group, without)
        self._buckets[i:i + 1] = new
        return new[0]

    def _step_from_host(self, active: list[_Bucket], hyper: list[tuple[float, float, float, float]],
                        total: Tensor) -> None:
        total_f = float(total)  # the one host sync of a step: the price of raising / skipping on NaN
        if total_f == 0.0:  # O(1) in steady state; a zero norm is what tensors frozen after the first step give
            for b in active:
                _check_trainable(b.params)
        if not math.isfinite(total_f):
            if self.nonfinite == "skip":
                self._skipped += 1
                return
            for b in active:
                for k, view in enumerate(b.grad_views):
                    if not bool(torch.isfinite(view).all()):
                        raise ValueError(
                            f"non-finite gradient (NaN or Inf) in keystone tensor {k} of shape "
                            f"{tuple(b.params[k].shape)}; the step was not taken (weights and optimizer state "
                            "unchanged). Pass nonfinite='skip' to skip such steps instead.")
            raise ValueError(
                f"the global gradient norm is {total_f} although every gradient is finite: their norm overflows "
                "float32 (gradients above ~1e19), so clipping and the update would be meaningless. The step was not "
                "taken (weights and optimizer state unchanged). Lower the learning rate or the loss scale, or pass "
                "nonfinite='skip' to skip such steps.")
        self._last_grad_norm = total_f
        scale = 1.0
        if self.max_grad_norm is not None and total_f > self.max_grad_norm:
            scale = self.max_grad_norm / (total_f + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        for b, (beta1, beta2, eps, lr) in zip(active, hyper):
            g = b.group
            step = int(b.step) + 1  # a CPU tensor: no device sync
            scalars = host_scalars(lr, g["weight_decay"], step, beta1, beta2, g["maximize"], scale)
            fused_adamw_scatter_unchecked(b.layout, b.master, b.grad, b.exp_avg, b.exp_avg_sq, b.max_exp_avg_sq,
                                          scalars=scalars, beta1=beta1, beta2=beta2, eps=eps, backend=self.backend)
            if b.sync is not None:
                b.sync.scatter()
            b.step += 1  # only once the step went through

    def _step_deferred(self, active: list[_Bucket], hyper: list[tuple[float, float, float, float]]) -> None:
        """The default mode's step, with no host sync: the norm, the clip scale and the skip decision stay on
        the device and are consumed by the kernel, as in capturable mode, while the host passes the scalars
        it knows (decay, bias corrections) as it does in "raise" mode, with the same rounding.

        The host reads the verdict (norm, skipped or not) at the next ``step()``, ``state_dict()`` or read
        of ``last_grad_norm`` / ``skipped_steps`` (:meth:`_settle`); by then the device has long finished
        this step, so on CUDA that read waits for this step's copy event alone, never for later work. Until
        then the step counts assume it went through; a skipped step takes them back.
        """
        total = _global_norm(active)
        bad = torch.isnan(total - total)  # True for a NaN or infinite norm (inf - inf is NaN); cat / stack make it 1.0
        scale64 = None
        if self.max_grad_norm is not None:  # the host path's formula, in the same double precision
            total64 = total.double()
            scale64 = torch.where(total64 > self.max_grad_norm, self.max_grad_norm / (total64 + 1e-6), 1.0)
        for b, (beta1, beta2, eps, lr) in zip(active, hyper):
            g = b.group
            dev = b.master.device
            # (decay, step_size, bc2_sqrt, +-1) from the host; the clip scale and the skip flag from the device.
            # Without clipping the four are rounded from double to fp32 on the host (as .float() would on the
            # device): 7 device ops per step instead of 11 (counted on the CPU), each a launch on a GPU.
            known = host_scalars(lr, g["weight_decay"], b.count + 1, beta1, beta2, g["maximize"], 1.0)
            if scale64 is None:
                scalars = torch.cat([_to_device(torch.tensor(known, dtype=torch.float32), dev),
                                     bad.to(dev).reshape(1)])
            else:
                known = _to_device(torch.tensor(known, dtype=torch.float64), dev)
                scalars = torch.cat([known[:3], known[3:] * scale64.to(dev), bad.double().to(dev).reshape(1)]).float()
            fused_adamw_scatter_unchecked(b.layout, b.master, b.grad, b.exp_avg, b.exp_avg_sq, b.max_exp_avg_sq,
                                          scalars=scalars, beta1=beta1, beta2=beta2, eps=eps, backend=self.backend)
            if b.sync is not None:
                b.sync.scatter()  # a skipped step rewrites the unchanged values: harmless
            b.step += 1  # provisional: _settle takes it back if the device skipped the step
            b.count += 1
        verdict = torch.stack([total, bad])
        done = None
        if verdict.device.type == "cuda":  # an async copy into pinned memory, and an event to wait for it alone
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(verdict, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            verdict = host
        self._last_grad_norm = None
        self._pending = _Pending(verdict, done, active)

    def _settle(self) -> None:
        """Read the verdict of the last deferred step, if any: its norm into ``last_grad_norm``, a skipped step's
        counts taken back (and, in "defer" mode, its error kept for the next ``step()``), a zero norm checked
        for frozen tensors as the host path does."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.done is not None:
            pending.done.synchronize()  # this step's copy only: later kernels keep running
        norm, bad = (float(v) for v in pending.verdict.numpy())  # a host buffer: no device read
        self._last_grad_norm = norm
        if bad:
            for b in pending.buckets:
                b.step -= 1
                b.count -= 1
            self._skipped += 1
            if self.nonfinite == "defer":
                self._deferred_error = (
                    f"the last step's gradients were not finite (global norm {norm}: a NaN or Inf, or values whose "
                    "norm overflows float32): that step was skipped, leaving weights and optimizer state as they "
                    "were, and this step was not taken either. KeystoneAdamW reads this verdict one step late so "
                    "that no step waits on the device; pass nonfinite='raise' to stop in the same step and name the "
                    "tensor (one host sync per step), or nonfinite='skip' to skip such steps and count them.")
        elif norm == 0.0:  # what tensors frozen after the layout was built give
            try:
                for b in pending.buckets:
                    _check_trainable(b.params)
            except ValueError as err:
                self._deferred_error = str(err)

    def _step_on_device(self, active: list[_Bucket], hyper: list[tuple[float, float, float, float | None]],
                        lrs: list[Tensor]) -> Tensor:
        """Every decision as a device tensor: no .item(), float(), bool() or copy to the host. Returns the
        global gradient norm before clipping.

        Each op below is a kernel launch on a GPU unless compiled (``compile_step``), so the lr lives on
        the device (``lrs``: float64 tensors that schedulers fill in place) and the five scalars are
        assembled with as few ops as the rounding allows. Pure tensor work on the buckets' arenas, so
        that torch.compile traces it whole.
        """
        total = _global_norm(active)
        bad = torch.isnan(total - total).float()  # 1.0 for a NaN or infinite norm (inf - inf is NaN)
        self._skipped_t += bad
        good = 1.0 - bad
        coef = None
        if self.max_grad_norm is not None:
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for b, (beta1, beta2, eps, _), lr in zip(active, hyper, lrs):
            g = b.group
            dev = b.step.device
            decay = 1.0 - lr * g["weight_decay"]
            b.step += good.to(dev)
            # In float64, like the host path (torch computes these in Python doubles), then rounded
            # once to fp32: capturable and default steps agree to the last bit.
            step = b.step.double().clamp(min=1.0)  # a skipped first step: keep the (unused) scalars finite
            bc1 = 1.0 - torch.pow(beta1, step)  # a Python base: pow's scalar-exponent shortcuts never apply
            bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step))
            gscale = b.one if coef is None else coef.to(dev)
            if g["maximize"]:
                gscale = -gscale
            scalars = torch.cat([torch.stack([decay, lr / bc1, bc2_sqrt]).float(), gscale.reshape(1),
                                 bad.to(dev).reshape(1)])
            fused_adamw_scatter_unchecked(b.layout, b.master, b.grad, b.exp_avg, b.exp_avg_sq, b.max_exp_avg_sq,
                                          scalars=scalars, beta1=beta1, beta2=beta2, eps=eps, backend=self.backend)

        return total

    def _device_lr(self, group: dict, device: torch.device) -> Tensor:
        """The group's lr as a float64 tensor on ``device``, read on the device every step.

        A float assigned after the layout was built (``group["lr"] = x``) becomes a tensor again;
        under a CUDA graph capture that is refused, since every replay would keep the captured value.
        """
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            if self._frozen_by == "captured in a CUDA graph":
                raise RuntimeError(
                    f"a param group's lr is the float {lr} in a step captured in a CUDA graph: every replay would "
                    "keep this value. Keep the lr a tensor and change it in place (group['lr'].fill_(x); torch's "
                    "schedulers do), as build_layout() set it up.")
            lr = group["lr"] = torch.tensor(lr, dtype=torch.float64, device=device)
        return lr.to(device, torch.float64)

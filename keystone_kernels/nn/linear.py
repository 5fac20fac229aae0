"""KeystoneLinear: a frozen low-precision weight plus dense fp32 keystone rows / columns.

For ``W: [out, in]`` with keystone rows R and columns C (docs/design.md sections 1 and 3):

- ``frozen_weight``: the whole matrix in ``frozen_dtype`` (bf16 by default), a buffer. It always
  holds the current keystone values (rounded), kept in sync by :meth:`KeystoneLinear.sync_frozen`
  and by the fused optimizer step, so the forward is one dense GEMM.
- ``weight_rows``: fp32 parameter ``[|R|, in]`` = ``W[R, :]`` (rows own their whole row).
- ``weight_cols``: fp32 parameter ``[out - |R|, |C|]`` = ``W[notR][:, C]`` (columns own the rest).
  Sized without the R rows so that every weight element belongs to exactly one trainable tensor
  and the parameter count equals :meth:`KeystoneMask.num_parameters`.
- ``bias_rows``: fp32 parameter ``[|R|]``, the bias of keystone rows (when the layer has a bias).

Backward returns the full input gradient and only the keystone gradients, through the gather
kernels of :mod:`keystone_kernels.ops`; no ``[out, in]`` gradient is ever allocated. It saves all
of ``X`` only when the layer has keystone rows, ``X[:, C]`` when it has columns only, and nothing
for the weight gradient when it has neither.

**The layer's contract** (what optimizers, I/O and sharding read, declared here and nowhere else):
:data:`~keystone_kernels.nn.parameter.KIND_ATTRS` names its keystone tensors; :meth:`KeystoneLinear.writes`
says where each one writes in the frozen weight (the optimizer's flat layout, ``sync_frozen``, merge
and the sharded scatter all use it), and :meth:`KeystoneLinear.keystone_values` takes each one's values
from a whole weight (the constructor, base-checkpoint loading and ``planned_shapes`` use it); the
class attributes ``sharded``, ``replica_group``, ``fingerprint_at`` / ``fingerprint_sample`` are the
state that FSDP2 sharding and meta-device loading set on it.

**No update may miss the frozen weight** (docs/design.md, "Keeping the frozen weight in sync").
Whoever changes a keystone tensor, the forward, ``merge`` and ``save_pretrained`` use the new value:

- :class:`KeystoneAdamW` scatters every step's values itself (one fused op).
- Any other ``torch.optim.Optimizer`` (SGD, torch's AdamW, Adafactor, bitsandbytes, the HF
  Trainer's default): a global step hook re-scatters the layers whose tensors it stepped.
- A direct edit (``p.copy_(x)``, ``p.data.copy_(x)``, ``p.data = x``, ``load_state_dict``): the
  tensors are :class:`KeystoneParameter`, whose ``.data`` shares autograd's version counter, so
  every edit bumps ``p._version``; an eager forward (and merge) compares the versions with those of
  the last scatter and re-scatters when they differ. Not seen under ``torch.compile`` (call
  :func:`~keystone_kernels.sync_frozen`), nor writes through a raw data pointer outside an optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from ..ops.checks import FLOAT_DTYPES, check_index
from ..ops.dispatch import gather_wgrad_unchecked, linear_autograd
from ..utils.dist import REPLICA_GROUP_ATTR, GroupTag
from ..utils.dtensor import is_dtensor, row_shard
from .hooks import install_optimizer_hooks
from .parameter import (
    KEYSTONE_ATTRS,
    KIND_ATTRS,
    KeystoneParameter,
    layout_changed,
    register_layer,
    tag,
)

__all__ = ["KeystoneLinear", "KeystoneWrite"]

_version_of = attrgetter("_version")
# The tensors an optimizer's flat layout points into (besides the keystone tensors themselves).
_STORAGE = ("frozen_weight", "frozen_bias", "rows", "cols", "col_rows")


def _compute_view(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The frozen tensor in the activations' dtype (an upcast copy on CPU, where bf16 GEMM is slow)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


class _KeystoneLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W the frozen weight; grads only for the keystone tensors.

    Inputs 1-3 (the keystone parameters) are not read by the forward (W already holds their
    values); they are inputs so that autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, x, weight_rows, weight_cols, bias_rows, frozen, bias, rows, col_rows, cols, bias_all, backend):
        y = F.linear(x, _compute_view(frozen, x.dtype), _compute_view(bias, x.dtype))
        need_rows = weight_rows is not None and ctx.needs_input_grad[1]
        need_cols = weight_cols is not None and ctx.needs_input_grad[2]
        x2d = x.reshape(-1, x.shape[-1])
        saved_x = x2d if need_rows else None
        # Columns only (o_proj / down_proj in the paper's mapping): keep |C| columns of X, not all.
        saved_xc = x2d.index_select(1, cols) if need_cols and not need_rows else None
        ctx.save_for_backward(saved_x, saved_xc, frozen, rows, col_rows, cols)
        ctx.bias_all = bias_all
        ctx.need = (need_rows, need_cols, bias_rows is not None and ctx.needs_input_grad[3])
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, saved_xc, frozen, rows, col_rows, cols = ctx.saved_tensors
        need_rows, need_cols, need_bias = ctx.need
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_rows = grad_cols = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _compute_view(frozen, grad_y.dtype)
        wgrad = gather_wgrad_unchecked if dy.dtype in FLOAT_DTYPES else ops.gather_wgrad  # else: its clear error
        if need_rows:
            grad_rows = wgrad(dy, saved_x.to(dy.dtype), rows, None, backend=ctx.backend)
        if need_cols:
            xc = saved_xc if saved_xc is not None else saved_x.index_select(1, cols)
            grad_cols = wgrad(dy, xc.to(dy.dtype), col_rows, None, backend=ctx.backend)
        if need_bias:
            picked = dy if ctx.bias_all else dy.index_select(1, rows)  # the whole bias, or its rows R
            grad_bias = picked.sum(0, dtype=torch.float32)
        return grad_x, grad_rows, grad_cols, grad_bias, None, None, None, None, None, None, None


def _complement(rows: Tensor, n: int) -> Tensor | None:
    """Sorted int64 indices of range(n) not in ``rows`` (CPU); None when rows is empty (all, in order)."""
    if not len(rows):
        return None
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero().flatten()


def _base_keys_to_patched(module: KeystoneLinear, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook (a plain function, so that a patched model still pickles)."""
    module.__dict__["_addresses_before_load"] = module.storage_addresses()
    module.load_base_tensors(state_dict, prefix)


def _tell_if_load_moved_storage(module: KeystoneLinear, incompatible_keys) -> None:
    """load_state_dict post-hook: ``assign=True`` or swapped tensors give the layer new memory; copies do not."""
    before = module.__dict__.pop("_addresses_before_load", None)
    if before is not None and before != module.storage_addresses():
        layout_changed(module, "load_state_dict gave the layer new tensors (assign=True, or swapped tensors)")


@dataclass(frozen=True)
class KeystoneWrite:
    """Where one keystone tensor's values go in its layer's frozen storage.

    ``getattr(layer, frozen)`` (as ``[out, 1]`` for the bias) at ``[rows[i], cols[j]]`` receives
    ``source()[i, j]``; rows / cols are on the layer's device (None: all, in order), ``host_rows``
    the same rows on the CPU, for shard arithmetic that must not read the device.
    """

    kind: str
    param: Tensor
    frozen: str
    rows: Tensor | None
    cols: Tensor | None
    host_rows: Tensor | None

    def source(self) -> Tensor:
        """The values as a 2-D fp32 tensor ``[n, m]`` (the bias as ``[n, 1]``), detached."""
        p = self.param.detach()
        return p.reshape(-1, 1) if self.kind == "bias" else p


def _put(target: Tensor, write: KeystoneWrite, values: Tensor) -> None:
    """``target[rows][:, cols] = values`` in any dtype (merge; the ops' scatter takes fp16 / bf16 / fp32 only)."""
    n, m = target.shape
    rows = write.rows if write.rows is not None else torch.arange(n, device=target.device)
    cols = write.cols if write.cols is not None else torch.arange(m, device=target.device)
    target[rows.to(target.device)[:, None], cols.to(target.device)[None, :]] = values.to(target.device, target.dtype)


class KeystoneLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (or GPT-2 ``Conv1D``, ``transposed=True``) training only keystone rows / columns.

    Args:
        weight: ``[out, in]`` original weight (any float dtype; copied).
        bias: ``[out]`` or None.
        rows, cols: int64 sorted unique keystone rows R and columns C (may be empty).
        frozen_dtype: storage dtype of the frozen matrix.
        backend: op backend for the weight-gradient kernels (see :func:`ops.resolve_backend`).
        train_bias: make the bias entries of keystone rows trainable (True), or the whole bias (``"all"``: the
            paper's recipe, where every bias trains).
        transposed: the module it replaces stored ``[in, out]`` (GPT-2 ``Conv1D``); used by merge.
    """

    #: kind of keystone tensor -> the attribute that holds it
    KIND_ATTRS = KIND_ATTRS
    #: True once :func:`~keystone_kernels.fully_shard` made the frozen weight and bias FSDP2 parameters sharded by
    #: rows (``Shard(0)``): each rank holds rows ``[lo, hi)``, and writes go to its local part only
    sharded: bool = False
    #: the process group the keystone gradients are averaged over when sharded (tagged onto the tensors)
    replica_group: GroupTag | None = None
    #: a model patched on the meta device: the 16 positions the base fingerprint samples, and their base values
    #: once loaded (:mod:`keystone_kernels.parallel.loading`)
    fingerprint_at: tuple[Tensor, Tensor] | None = None
    fingerprint_sample: Tensor | None = None
    #: the whole bias is a keystone tensor (``train_bias="all"``), not only its rows R
    bias_all: bool = False

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: Tensor, cols: Tensor,
                 frozen_dtype: torch.dtype = torch.bfloat16, backend: str | None = None, train_bias: bool | str = True,
                 transposed: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.transposed = backend, transposed
        device = weight.device
        weight = weight.detach()
        # The index values, on the CPU: on the meta device the buffers below hold none, and
        # ``to_empty`` (materialising a meta model) refills them from these (see _apply).
        self._host_index = (rows.to("cpu", torch.int64, copy=True), cols.to("cpu", torch.int64, copy=True))
        # own copies: the same tensor passed twice to the autograd Function breaks torch.compile's graph
        rows = rows.to(device, torch.int64, copy=True)
        cols = cols.to(device, torch.int64, copy=True)
        self.register_buffer("frozen_weight", self.frozen_storage(weight.to(frozen_dtype), len(rows), len(cols)),
                             persistent=True)
        self.register_buffer("frozen_bias", None if bias is None else bias.detach().to(frozen_dtype).clone(),
                             persistent=True)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        col_rows = _complement(self._host_index[0], out_features)
        col_rows = None if col_rows is None else col_rows.to(device)
        self.register_buffer("col_rows", col_rows, persistent=False)
        if train_bias not in (True, False, "all"):
            raise ValueError(f"train_bias must be True, False or 'all', got {train_bias!r}")
        self.bias_all = train_bias == "all" and bias is not None  # the whole bias trains, not only rows R
        # fp32 masters start from the original values, not from their frozen_dtype rounding
        masters = self.keystone_values(weight, bias, *self._host_index, train_bias)
        for attr in KEYSTONE_ATTRS:  # in this order: rows, cols, bias (the state dict's order)
            setattr(self, attr, nn.Parameter(masters[attr]) if attr in masters else None)
        self._synced_versions: tuple[int, ...] | None = None  # keystone tensors' versions at the last scatter
        self._validate_indices()
        self._tag_parameters()
        if not weight.is_meta:  # a meta weight has no values to sync (load them after to_empty)
            # A one-time copy with the reference ops: a layer is often built on the CPU and moved
            # after (``.to("cuda")``), where the chosen backend (Triton) cannot run yet.
            self.sync_frozen(backend="reference")
        self.register_load_state_dict_pre_hook(_base_keys_to_patched)
        self.register_load_state_dict_post_hook(_tell_if_load_moved_storage)
        install_optimizer_hooks()

    # ------------------------------------------------------------------ the tensors and where they write

    def _tag_parameters(self) -> None:
        """Tell each keystone tensor which layer and which part (rows / cols / bias) it is.

        The optimizer finds the frozen weight to scatter into through this weak reference. It is set
        again after deepcopy / unpickling (:meth:`__setstate__`), which copy parameters without it.
        """
        self._retag()
        self.retired = False
        register_layer(self)

    def _retag(self) -> None:
        host_rows = self._host_index[0]
        writes = []
        for kind, attr in KIND_ATTRS.items():
            p = self._parameters.get(attr)
            if p is None:
                continue
            if type(p) is nn.Parameter:  # in place, so that every reference to it sees edits counted
                p.__class__ = KeystoneParameter
            tag(p, self, kind)
            if self.replica_group is not None:
                setattr(p, REPLICA_GROUP_ATTR, self.replica_group)
            if kind == "cols":
                writes.append(KeystoneWrite(kind, p, "frozen_weight", self.col_rows, self.cols,
                                            _complement(host_rows, self.out_features)))
            elif kind == "bias" and self.bias_all:
                writes.append(KeystoneWrite(kind, p, "frozen_bias", None, None, None))
            else:
                writes.append(KeystoneWrite(kind, p, "frozen_weight" if kind == "rows" else "frozen_bias", self.rows,
                                            None, host_rows))
        # Kept in the instance dict: the forward reads the versions on every call, sync reads the writes.
        self.__dict__["_versioned"] = tuple(w.param for w in writes)
        self.__dict__["_writes"] = tuple(writes)
        self.__dict__["_shard_parts"] = {}

    @staticmethod
    def frozen_storage(weight: Tensor, n_rows: int, n_cols: int) -> Tensor:
        """The frozen ``[out, in]`` weight as this layer stores it: row-major, or column-major (a ``[out, in]``
        view of a contiguous ``[in, out]`` buffer, strides ``(1, out)``) for a layer that owns keystone
        columns and no rows (o_proj / down_proj in the paper's mapping).

        Why: the optimizer writes each keystone value back into the frozen weight. A keystone column of
        a row-major weight is one element per row, each in its own cache line, which a CPU step pays as
        a line read per element and a GPU as a 32-byte sector per 2-byte store; column-major makes every
        column a contiguous run (measured: docs/design.md section 5, bench/results/colmajor_ab_cpu). The
        orientation is internal: every reader sees ``[out, in]``, the kernels take strides, and
        ``merged_weight``, ``state_dict`` consumers and export get contiguous row-major copies where
        they need them.
        """
        if n_cols and not n_rows:
            return weight.t().contiguous().t()
        return weight.contiguous()

    @staticmethod
    def keystone_values(weight: Tensor | None, bias: Tensor | None, rows: Tensor, cols: Tensor,
                        train_bias: bool | str = True) -> dict[str, Tensor]:
        """``{attribute: fp32 values}`` of the keystone tensors a layer over ``weight`` / ``bias`` holds: where each
        keystone tensor sits in the frozen weight, the inverse of :meth:`writes`.

        ``weight`` ``[out, in]`` gives ``weight_rows`` = ``weight[R, :]`` (when R is not empty) and
        ``weight_cols`` = ``weight[not R][:, C]`` (when C is not empty); ``bias`` ``[out]`` gives ``bias_rows`` =
        ``bias[R]`` (``train_bias`` true and R not empty) or the whole bias (``train_bias="all"``). A None
        tensor gives none of its entries. ``rows`` / ``cols``: int64 sorted unique indices on the CPU. On the
        meta device this gives the shapes only. The constructor, :meth:`load_base_tensors` and
        :func:`~keystone_kernels.patching.planned_shapes` all ask it.
        """
        out = {}
        if weight is not None:
            weight = weight.detach()
            if len(rows):
                out[KIND_ATTRS["rows"]] = weight.index_select(0, rows.to(weight.device)).float()
            if len(cols):
                others = _complement(rows, weight.shape[0])
                src = weight if others is None else weight.index_select(0, others.to(weight.device))
                out[KIND_ATTRS["cols"]] = src.index_select(1, cols.to(weight.device)).float()
        if bias is not None:
            bias = bias.detach()
            if train_bias == "all":
                out[KIND_ATTRS["bias"]] = bias.float().clone()
            elif train_bias and len(rows):
                out[KIND_ATTRS["bias"]] = bias.index_select(0, rows.to(bias.device)).float()
        return out

    def writes(self) -> tuple[KeystoneWrite, ...]:
        """Where each keystone tensor writes in the frozen storage, in the order rows, cols, bias.

        A row tensor ``[|R|, in]`` writes the rows R of ``frozen_weight``; a column tensor
        ``[out - |R|, |C|]`` the columns C of every other row; a bias tensor ``[|R|]`` the entries R of
        ``frozen_bias``. Every writer of the frozen storage goes through this: the optimizer's flat
        layout, :meth:`sync_frozen` (sharded or not) and :meth:`merged_weight`.
        """
        return self._writes

    def frozen_2d(self, write: KeystoneWrite) -> Tensor:
        """The whole frozen storage ``write`` goes into, 2-D (the bias as ``[out, 1]``)."""
        t = getattr(self, write.frozen)
        return t.view(-1, 1) if write.kind == "bias" else t

    def local_frozen(self, name: str = "frozen_weight") -> tuple[Tensor, int, int]:
        """``(tensor, lo, hi)``: the part of ``frozen_weight`` / ``frozen_bias`` this rank holds (its rows
        ``[lo, hi)``; a bias as ``[n, 1]``). The whole tensor with ``(0, out)`` when not sharded.

        RuntimeError when sharded and FSDP2 holds the weight unsharded (between forward and backward).
        """
        t = getattr(self, name)
        if self.sharded:
            if not is_dtensor(t):
                raise RuntimeError("a sharded layer's frozen weight was written while FSDP2 held it unsharded (between "
                                   "forward and backward?); step or edit after backward, when FSDP2 has resharded "
                                   "every layer")
            lo, hi = row_shard(t)
            t = t.to_local()
        else:
            lo, hi = 0, t.shape[0]
        return (t.view(-1, 1) if t.dim() == 1 else t), lo, hi

    def _shard_part(self, write: KeystoneWrite, lo: int, hi: int) -> tuple[int, int, Tensor]:
        """``(i0, i1, rows)``: the rows ``[i0, i1)`` of ``write``'s tensor that fall in the shard ``[lo, hi)``, and
        their rows in the local part (on the device). Computed from the host rows once per shard."""
        key = (write.kind, lo, hi)
        part = self._shard_parts.get(key)
        if part is None:
            rows = write.host_rows if write.host_rows is not None else torch.arange(self.out_features)
            i0, i1 = (int(i) for i in torch.searchsorted(rows, torch.tensor([lo, hi])))
            part = (i0, i1, (rows[i0:i1] - lo).to(self.rows.device))
            self._shard_parts[key] = part
        return part

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """``nn.Module``'s, plus: a keystone tensor assigned later (``module.weight_rows = nn.Parameter(...)``,
        ``load_state_dict(assign=True)``) is tagged and marks the frozen weight stale."""
        super().register_parameter(name, param)
        if name in KEYSTONE_ATTRS and "_synced_versions" in self.__dict__:
            self._retag()
            self._synced_versions = None
            layout_changed(self, f"its {name} was assigned a new tensor")

    def __setattr__(self, name: str, value) -> None:
        """``nn.Module``'s, plus: replacing a frozen buffer or an index tensor (``layer.frozen_weight = t``)
        tells the optimizers that point into the old one."""
        if name in _STORAGE and "_synced_versions" in self.__dict__:
            old = self._buffers.get(name)
            super().__setattr__(name, value)
            if self._buffers.get(name) is not old:
                self._synced_versions = None  # the new frozen weight has not received the keystone values
                if name in ("rows", "cols", "col_rows"):
                    self._validate_indices()
                layout_changed(self, f"its {name} was replaced by another tensor")
            return
        super().__setattr__(name, value)

    def storage_addresses(self) -> tuple[int, ...]:
        """The data pointers of the frozen buffers, index tensors and keystone tensors (0 for None / meta):
        what an optimizer's flat layout points into. A change means the layout is stale."""
        tensors = [self._buffers.get(n) for n in _STORAGE] + [self._parameters.get(a) for a in KEYSTONE_ATTRS]
        return tuple(0 if t is None or t.is_meta else t.data_ptr() for t in tensors)

    def _validate_indices(self) -> None:
        """Check the index tensors' values now (a device sync on a GPU), so that no op checks them inside a
        step: the checks are remembered per tensor (:func:`~keystone_kernels.ops.checks.check_index`), and a
        sync there would break a CUDA graph capture."""
        device = self.rows.device
        check_index("rows", self.rows, self.out_features, device, unique=True)
        check_index("cols", self.cols, self.in_features, device, unique=True)
        check_index("col_rows", self.col_rows, self.out_features, device, unique=True)

    def keystone_indices(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)``: the keystone row and column indices (int64, CPU), as given to the constructor."""
        return self._host_index

    def keystone_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors ``[weight_rows, weight_cols, bias_rows]``, those that exist."""
        return [p for p in map(self._parameters.get, KEYSTONE_ATTRS) if p is not None]

    def mark_sharded(self, group: GroupTag) -> None:
        """Called by :func:`~keystone_kernels.fully_shard` once FSDP2 owns the frozen weight and bias: writes go
        to this rank's rows from now on, and the keystone tensors are tagged with the group that averages
        their gradients."""
        self.sharded, self.replica_group = True, group
        self._retag()

    # ------------------------------------------------------------------ keeping the frozen copy in sync

    def _keystone_versions(self) -> tuple[int, ...]:
        """The autograd versions of the keystone tensors: any in-place edit of one changes this."""
        return tuple(map(_version_of, self._versioned))

    def refresh(self) -> bool:
        """Re-scatter the keystone values when a tensor was edited since the last scatter; True when it did.

        The eager forward calls this (its cost: bench/results/any_optimizer_ab), and so do merge and
        ablate. A sharded layer is left to the optimizer and :meth:`sync_frozen` (FSDP2 holds it
        unsharded during the forward).
        """
        if self._synced_versions == self._keystone_versions() or self.sharded or self.frozen_weight.is_meta:
            return False
        self.sync_frozen()
        return True

    @torch.no_grad()
    def sync_frozen(self, backend: str | None = None) -> None:
        """Scatter the fp32 keystone values into the frozen storage (rounded to nearest even), with ``backend``
        (default: the layer's own). On a sharded layer, into the rows of this rank's part only."""
        backend = backend or self.backend
        for w in self._writes:
            if self.sharded:
                local, lo, hi = self.local_frozen(w.frozen)
                i0, i1, rows = self._shard_part(w, lo, hi)
                if i1 > i0:
                    ops.scatter_to_frozen(local, w.source()[i0:i1], rows, w.cols, backend=backend)
            else:
                ops.scatter_to_frozen(self.frozen_2d(w), w.source(), w.rows, w.cols, backend=backend)
        self._synced_versions = self._keystone_versions()

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None, masters: bool = False, weight: Tensor | None = None,
                      bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``([out, in], [out] or None)`` in ``dtype``: the weight this layer computes with.

        By default the frozen matrix as it is: it holds the keystone values rounded to
        ``frozen_dtype``, exactly what the patched forward used, so a merged model reproduces the
        patched one's outputs. ``masters=True`` writes the fp32 keystone values instead (more
        precise than what was trained through, when ``dtype`` is wider than ``frozen_dtype``).
        ``weight`` / ``bias``: the whole frozen tensors to start from, for a sharded layer whose
        caller gathered them (default: this layer's own).
        """
        self.refresh()  # an edit no forward has seen yet
        weight = self.frozen_weight if weight is None else weight
        bias = self.frozen_bias if bias is None else bias
        dtype = dtype or weight.dtype
        out = {"frozen_weight": weight.to(dtype, memory_format=torch.contiguous_format, copy=True),
               "frozen_bias": None if bias is None else bias.to(dtype, copy=True)}
        if masters:
            for w in self._writes:
                target = out[w.frozen]
                _put(target.view(-1, 1) if w.kind == "bias" else target, w, w.source())
        return out["frozen_weight"], out["frozen_bias"]

    # ------------------------------------------------------------------ loading a base checkpoint

    @torch.no_grad()
    def load_base_tensors(self, state_dict: dict, prefix: str) -> None:
        """Turn the base model's ``prefix + "weight"`` / ``"bias"`` entries of ``state_dict`` into this layer's keys.

        ``weight`` ([out, in]; GPT-2 Conv1D [in, out]) becomes the frozen weight in the frozen dtype
        and the fp32 masters of the keystone rows / columns, taken from the original values as
        :func:`~keystone_kernels.patch` does; ``bias`` likewise. So a model patched on the meta device
        loads a base checkpoint (whole, or one safetensors shard at a time with ``strict=False``)
        after ``to_empty``, through ``load_state_dict`` (this is its pre-hook) or
        :func:`~keystone_kernels.load_base_weights`. The values at :attr:`fingerprint_at` are kept.
        """
        weight = state_dict.pop(prefix + "weight", None) if prefix + "frozen_weight" not in state_dict else None
        if weight is not None:
            w = weight.t() if self.transposed else weight
            if tuple(w.shape) != (self.out_features, self.in_features):
                layout = " transposed (Conv1D)" if self.transposed else ""
                raise ValueError(f"{prefix}weight has shape {tuple(weight.shape)}, expected "
                                 f"{(self.out_features, self.in_features)}{layout}")
            state_dict[prefix + "frozen_weight"] = w.to(self.frozen_weight.dtype)
            for attr, values in self.keystone_values(w, None, *self._host_index).items():
                state_dict[prefix + attr] = values
            if self.fingerprint_at is not None:
                r, c = self.fingerprint_at
                self.fingerprint_sample = w[r.to(w.device), c.to(w.device)].to(torch.bfloat16).float().cpu()
        bias = None
        if prefix + "frozen_bias" not in state_dict and self.frozen_bias is not None:
            bias = state_dict.pop(prefix + "bias", None)
        if bias is not None:
            state_dict[prefix + "frozen_bias"] = bias.to(self.frozen_bias.dtype)
            train_bias = "all" if self.bias_all else self.bias_rows is not None
            for attr, values in self.keystone_values(None, bias, *self._host_index, train_bias).items():
                state_dict[prefix + attr] = values

    # ------------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn, recurse=True):
        was_meta = self.rows.is_meta
        reason = "the layer was moved or cast (.to(), .cuda(), .half(), to_empty())"
        layout_changed(self, reason)  # first, so that this is the reason given, not the p.data = ... inside
        out = super()._apply(fn, recurse)
        if was_meta and not self.rows.is_meta:  # to_empty: the index buffers hold garbage, refill them
            rows, cols = self._host_index
            with torch.no_grad():
                self.rows.copy_(rows)
                self.cols.copy_(cols)
                if self.col_rows is not None:
                    self.col_rows.copy_(_complement(rows, self.out_features))
        self._retag()  # a move off the meta device makes new Parameter objects, and new index buffers
        self._validate_indices()
        layout_changed(self, reason)
        return out

    def retire(self) -> None:
        """Mark this layer as replaced (by :func:`~keystone_kernels.merge`): optimizers refuse its tensors."""
        self.retired = True
        layout_changed(self, "the layer was merged")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._tag_parameters()
        self._validate_indices()

    @property
    def weight(self) -> Tensor:
        """The frozen ``[out, in]`` matrix (read-only view for code that inspects ``module.weight``)."""
        return self.frozen_weight

    @property
    def bias(self) -> Tensor | None:
        return self.frozen_bias

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., in]`` (fp32 / bf16 / fp16) -> ``[..., out]`` in x's dtype."""
        if not torch.compiler.is_compiling():  # a compiled graph cannot branch on versions: sync_frozen there
            self.refresh()
            if type(x) is Tensor and not self.sharded:  # eager, plain tensors: the C++ function if the backend has it
                fused = linear_autograd(self.backend, x.device)
                if fused is not None:
                    return fused(x, self.weight_rows, self.weight_cols, self.bias_rows, self.frozen_weight,
                                 self.frozen_bias, self.rows, self.col_rows, self.cols, self.bias_all)
        return _KeystoneLinearFunction.apply(
            x, self.weight_rows, self.weight_cols, self.bias_rows, self.frozen_weight, self.frozen_bias,
            self.rows, self.col_rows, self.cols, self.bias_all, self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={len(self.rows)}, "
                f"cols={len(self.cols)}, frozen_dtype={str(self.frozen_weight.dtype).replace('torch.', '')}, "
                f"backend={self.backend}")

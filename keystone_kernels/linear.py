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

import weakref
from operator import attrgetter

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import ops

# Bumped whenever a KeystoneLinear's tensors may have moved or gone: ``.to()`` / ``.cuda()`` /
# ``.half()`` (``_apply``), merge, or the module being freed. KeystoneAdamW compares it once per
# step and rebuilds its flat layout when it changed, so a cached address never outlives its tensor.
_layout_epoch = [0]


def layout_epoch() -> int:
    """A counter that changes whenever any KeystoneLinear's frozen or keystone tensors may have moved."""
    return _layout_epoch[0]


def _bump_layout_epoch() -> None:
    _layout_epoch[0] += 1


# Every live KeystoneLinear, so that the optimizer can tell a keystone tensor that lost its tag (a
# wrapper replaced the parameter object) from a plain parameter: see :func:`find_owner`.
_live: weakref.WeakSet = weakref.WeakSet()
_KEYSTONE_ATTRS = ("weight_rows", "weight_cols", "bias_rows")
_KIND_ATTR = {"rows": "weight_rows", "cols": "weight_cols", "bias": "bias_rows"}
_set_data = torch._C.TensorBase.data.__set__  # torch's own ``p.data = t``: no version bump, no epoch bump
_version_of = attrgetter("_version")


class KeystoneParameter(nn.Parameter):
    """An fp32 keystone tensor of a :class:`KeystoneLinear`: an ``nn.Parameter`` whose every edit is visible.

    torch's ``p.data`` is an alias with a version counter of its own, so ``p.data.copy_(x)`` would
    change the values without ``p._version`` moving, and the layer could not tell that its frozen
    weight is stale. Here ``p.data`` is ``p.detach()`` (the same memory and the same version
    counter), and assigning ``p.data = x`` bumps the version and the layout epoch (an optimizer's
    arena no longer holds the tensor). Everything else is ``nn.Parameter``.
    """

    @property
    def data(self) -> Tensor:
        return self.detach()

    @data.setter
    def data(self, value: Tensor) -> None:
        _set_data(self, value)
        torch.autograd.graph.increment_version(self)
        _bump_layout_epoch()

    def __repr__(self) -> str:
        return "KeystoneParameter containing:\n" + repr(self.detach())


def rebind_data(p: Tensor, storage: Tensor) -> None:
    """Point ``p`` at ``storage`` (same shape, dtype and values) without marking it edited.

    For an optimizer that moves keystone tensors into its own arenas: the values do not change, so
    neither the version nor the layout epoch moves (``p.data = storage`` would bump both).
    """
    _set_data(p, storage)


def find_owner(p: Tensor) -> tuple[KeystoneLinear, str] | None:
    """``(module, attribute)`` of the live KeystoneLinear that holds ``p`` as a keystone tensor, or None.

    O(number of KeystoneLinear modules); the optimizer calls it only for untagged tensors, once per layout.
    """
    for module in list(_live):
        for attr in _KEYSTONE_ATTRS:
            if module._parameters.get(attr) is p:
                return module, attr
    return None


def owner_of(p: Tensor) -> tuple[KeystoneLinear, str] | None:
    """``(module, kind)`` of the live KeystoneLinear whose keystone tensor ``p`` is, or None for a plain tensor.

    kind is ``"rows"``, ``"cols"`` or ``"bias"``. Raises ValueError, saying what to do, where stepping
    ``p`` would update nothing the model uses: its module was merged or freed, a wrapper replaced
    the module's tensor after ``p`` was taken (``p`` is not its module's any more), or a wrapper
    replaced the parameter object and it lost its tag (FSDP1, torch's ``fully_shard``).
    """
    owner_ref = getattr(p, "_keystone_owner", None)
    if owner_ref is None:
        found = find_owner(p) if _live else None
        if found is not None:
            raise ValueError(
                f"the {found[1]} tensor of shape {tuple(p.shape)} of a KeystoneLinear has lost its keystone tag (a "
                "wrapper such as FSDP1 or torch's fully_shard replaced the parameter object), so the optimizer cannot "
                "find the frozen weight it must update. Wrap the patched model with DDP or "
                "keystone_kernels.fully_shard, and build the optimizer from keystone_parameters(model) afterwards.")
        return None
    owner: KeystoneLinear | None = owner_ref()
    if owner is None or owner.retired:
        raise ValueError(
            f"a keystone tensor of shape {tuple(p.shape)} belongs to a KeystoneLinear that was "
            f"{'freed' if owner is None else 'merged'}: stepping it would update nothing the model uses. "
            "Build a new optimizer over keystone_parameters(model) of the live patched model.")
    kind = p._keystone_kind
    if owner._parameters.get(_KIND_ATTR[kind]) is not p:
        raise ValueError(
            f"a keystone tensor of shape {tuple(p.shape)} is no longer its module's {_KIND_ATTR[kind]} (a wrapper "
            "such as torch's fully_shard replaced it after the optimizer was built): stepping it would update "
            "nothing the model uses. Shard with keystone_kernels.fully_shard(model) first, then build the optimizer "
            "from keystone_parameters(model).")
    return owner, kind


# ---------------------------------------------------------------------------------------- any optimizer
# torch.optim's global step hooks: after the step of any optimizer that does not scatter keystone
# values itself, re-scatter the KeystoneLinear layers whose tensors it holds. The layers of an
# optimizer are found once and cached until its param groups or the layout epoch change.
_optimizer_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook_handles: list = []


def _layers_of(optimizer: torch.optim.Optimizer) -> list[weakref.ref]:
    """Weak references to the KeystoneLinear layers whose keystone tensors ``optimizer`` steps (validated)."""
    groups = optimizer.param_groups
    key = (layout_epoch(), tuple(id(g["params"]) for g in groups), tuple(len(g["params"]) for g in groups))
    cached = _optimizer_layers.get(optimizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers: dict[int, weakref.ref] = {}
    for g in groups:
        for p in g["params"]:
            found = owner_of(p)
            if found is None:
                continue
            owner = found[0]
            if getattr(owner, "_keystone_fsdp", None):
                raise ValueError(
                    f"{type(optimizer).__name__} steps keystone tensors of a model sharded by "
                    "keystone_kernels.fully_shard: FSDP2 reduces none of their gradients there (they are ignored "
                    "parameters), so every rank would train its own copy. Use keystone_kernels.KeystoneAdamW, which "
                    "all-reduces them in one collective per step.")
            layers[id(owner)] = weakref.ref(owner)
    refs = list(layers.values())
    _optimizer_layers[optimizer] = (key, refs)
    return refs


def _writes_frozen_weights(optimizer) -> bool:
    """True for an optimizer that scatters keystone values itself, and for a wrapper of another optimizer
    (accelerate's ``AcceleratedOptimizer``): the wrapped one's own step runs these hooks."""
    return (getattr(optimizer, "writes_frozen_weights", False)
            or isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer))


def _before_any_step(optimizer, args, kwargs) -> None:
    """Refuse, before it changes anything, a step that would update tensors the model no longer uses."""
    if _live and not _writes_frozen_weights(optimizer):
        _layers_of(optimizer)


def _after_any_step(optimizer, args, kwargs) -> None:
    if not _live or _writes_frozen_weights(optimizer):
        return
    for ref in _layers_of(optimizer):
        layer = ref()
        if layer is not None:
            layer.sync_frozen()


def _install_optimizer_hooks() -> None:
    """Register the global step hooks once (on the first KeystoneLinear, not at import)."""
    if not _hook_handles:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _hook_handles.append(register_optimizer_step_pre_hook(_before_any_step))
        _hook_handles.append(register_optimizer_step_post_hook(_after_any_step))


class _OwnerRef:
    """A weak reference from a keystone tensor to its KeystoneLinear that survives pickling.

    ``weakref.ref`` itself cannot be pickled, and ``torch.save(model)`` pickles each Parameter with
    its attributes. This one pickles as a dead reference; the module re-tags its tensors when it
    is unpickled (:meth:`KeystoneLinear.__setstate__`).
    """

    __slots__ = ("_ref",)

    def __init__(self, owner=None):
        self._ref = weakref.ref(owner) if owner is not None else None

    def __call__(self):
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return (_OwnerRef, ())


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
    def forward(ctx, x, weight_rows, weight_cols, bias_rows, frozen, bias, rows, col_rows, cols, backend):
        y = F.linear(x, _compute_view(frozen, x.dtype), _compute_view(bias, x.dtype))
        need_rows = weight_rows is not None and ctx.needs_input_grad[1]
        need_cols = weight_cols is not None and ctx.needs_input_grad[2]
        x2d = x.reshape(-1, x.shape[-1])
        saved_x = x2d if need_rows else None
        # Columns only (o_proj / down_proj in the paper's mapping): keep |C| columns of X, not all.
        saved_xc = x2d.index_select(1, cols) if need_cols and not need_rows else None
        ctx.save_for_backward(saved_x, saved_xc, frozen, rows, col_rows, cols)
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
        if need_rows:
            grad_rows = ops.gather_wgrad(dy, saved_x.to(dy.dtype), rows, None, backend=ctx.backend)
        if need_cols:
            xc = saved_xc if saved_xc is not None else saved_x.index_select(1, cols)
            grad_cols = ops.gather_wgrad(dy, xc.to(dy.dtype), col_rows, None, backend=ctx.backend)
        if need_bias:
            grad_bias = dy.index_select(1, rows).sum(0, dtype=torch.float32)
        return grad_x, grad_rows, grad_cols, grad_bias, None, None, None, None, None, None


def _complement(rows: Tensor, n: int) -> Tensor | None:
    """Sorted int64 indices of range(n) not in ``rows`` (CPU); None when rows is empty (all, in order)."""
    if not len(rows):
        return None
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def _base_keys_to_patched(module: KeystoneLinear, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: accept the base model's ``weight`` / ``bias`` keys (a plain checkpoint).

    ``prefix + "weight"`` ([out, in]; GPT-2 Conv1D [in, out]) becomes the frozen weight in the frozen
    dtype and the fp32 masters of the keystone rows / columns, taken from the original values as
    :func:`~keystone_kernels.patch` does; ``prefix + "bias"`` likewise. So a model patched on the
    meta device loads a base checkpoint (whole, or one safetensors shard at a time with
    ``strict=False``) after ``to_empty``. The 16 sampled values of the base fingerprint are kept.
    """
    weight = state_dict.pop(prefix + "weight", None) if prefix + "frozen_weight" not in state_dict else None
    if weight is not None:
        w = weight.t() if module.transposed else weight
        if tuple(w.shape) != (module.out_features, module.in_features):
            layout = " transposed (Conv1D)" if module.transposed else ""
            raise ValueError(f"{prefix}weight has shape {tuple(weight.shape)}, expected "
                             f"{(module.out_features, module.in_features)}{layout}")
        rows, cols = module._host_index
        state_dict[prefix + "frozen_weight"] = w.to(module.frozen_weight.dtype)
        if len(rows):
            state_dict[prefix + "weight_rows"] = w.index_select(0, rows.to(w.device)).float()
        if len(cols):
            src = w if not len(rows) else w.index_select(0, _complement(rows, module.out_features).to(w.device))
            state_dict[prefix + "weight_cols"] = src.index_select(1, cols.to(w.device)).float()
        positions = getattr(module, "_fingerprint_at", None)
        if positions is not None:
            r, c = positions
            module._fingerprint_sample = w[r.to(w.device), c.to(w.device)].to(torch.bfloat16).float().cpu()
    bias = None
    if prefix + "frozen_bias" not in state_dict and module.frozen_bias is not None:
        bias = state_dict.pop(prefix + "bias", None)
    if bias is not None:
        state_dict[prefix + "frozen_bias"] = bias.to(module.frozen_bias.dtype)
        if module.bias_rows is not None:
            state_dict[prefix + "bias_rows"] = bias.index_select(0, module._host_index[0].to(bias.device)).float()


class KeystoneLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (or GPT-2 ``Conv1D``, ``transposed=True``) training only keystone rows / columns.

    Args:
        weight: ``[out, in]`` original weight (any float dtype; copied).
        bias: ``[out]`` or None.
        rows, cols: int64 sorted unique keystone rows R and columns C (may be empty).
        frozen_dtype: storage dtype of the frozen matrix.
        backend: op backend for the weight-gradient kernels (see :func:`ops.resolve_backend`).
        train_bias: make the bias entries of keystone rows trainable.
        transposed: the module it replaces stored ``[in, out]`` (GPT-2 ``Conv1D``); used by merge.
    """

    #: kind of keystone tensor -> the attribute that holds it (the layer's contract with optimizers and I/O)
    KIND_ATTRS = _KIND_ATTR

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: Tensor, cols: Tensor,
                 frozen_dtype: torch.dtype = torch.bfloat16, backend: str | None = None, train_bias: bool = True,
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
        self.register_buffer("frozen_weight", weight.to(frozen_dtype).contiguous(), persistent=True)
        self.register_buffer("frozen_bias", None if bias is None else bias.detach().to(frozen_dtype).clone(),
                             persistent=True)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        col_rows = _complement(self._host_index[0], out_features)
        col_rows = None if col_rows is None else col_rows.to(device)
        self.register_buffer("col_rows", col_rows, persistent=False)
        # fp32 masters start from the original values, not from their frozen_dtype rounding
        self.weight_rows = nn.Parameter(weight.index_select(0, rows).float()) if len(rows) else None
        cols_src = weight if col_rows is None else weight.index_select(0, col_rows)
        self.weight_cols = nn.Parameter(cols_src.index_select(1, cols).float()) if len(cols) else None
        self.bias_rows = (nn.Parameter(bias.detach().index_select(0, rows).float())
                          if bias is not None and train_bias and len(rows) else None)
        self._synced_versions: tuple[int, ...] | None = None  # keystone tensors' versions at the last scatter
        self._tag_parameters()
        if not weight.is_meta:  # a meta weight has no values to sync (load them after to_empty)
            # A one-time copy with the reference ops: a layer is often built on the CPU and moved
            # after (``.to("cuda")``), where the chosen backend (Triton) cannot run yet.
            self.sync_frozen(backend="reference")
        self.register_load_state_dict_pre_hook(_base_keys_to_patched)
        _install_optimizer_hooks()

    def _tag_parameters(self) -> None:
        """Tell each keystone tensor which module and which part (rows / cols / bias) it is.

        The optimizer finds the frozen weight to scatter into through this weak reference. It is set
        again after deepcopy / unpickling (:meth:`__setstate__`), which copy parameters without it.
        """
        self._retag()
        self.retired = False
        _live.add(self)
        weakref.finalize(self, _bump_layout_epoch)

    def _retag(self) -> None:
        for kind, attr in _KIND_ATTR.items():
            p = self._parameters.get(attr)
            if p is not None:
                self._tag(p, kind)
        # the tensors whose versions refresh() reads, kept as a tuple: the forward reads it on every call
        self.__dict__["_versioned"] = tuple(p for p in map(self._parameters.get, _KEYSTONE_ATTRS) if p is not None)

    def _tag(self, p: nn.Parameter, kind: str) -> None:
        if type(p) is nn.Parameter:  # in place, so that every reference to it sees edits counted
            p.__class__ = KeystoneParameter
        p._keystone_owner = _OwnerRef(self)
        p._keystone_kind = kind
        group = getattr(self, "_keystone_group", None)  # set by keystone_kernels.fully_shard
        if group is not None:
            p._keystone_replicated_group = group

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """``nn.Module``'s, plus: a keystone tensor assigned later (``module.weight_rows = nn.Parameter(...)``,
        ``load_state_dict(assign=True)``) is tagged and marks the frozen weight stale."""
        super().register_parameter(name, param)
        if name in _KEYSTONE_ATTRS and "_synced_versions" in self.__dict__:
            self._retag()
            self._synced_versions = None
            _bump_layout_epoch()

    def _keystone_versions(self) -> tuple[int, ...]:
        """The autograd versions of the keystone tensors: any in-place edit of one changes this."""
        return tuple(map(_version_of, self._versioned))

    def refresh(self) -> bool:
        """Re-scatter the keystone values when a tensor was edited since the last scatter; True when it did.

        The eager forward calls this (a few hundred nanoseconds), and so do merge and save. A layer sharded
        by :func:`~keystone_kernels.fully_shard` is left to the optimizer and :meth:`sync_frozen`.
        """
        if self._synced_versions == self._keystone_versions() or self.frozen_weight.is_meta:
            return False
        if getattr(self, "_keystone_fsdp", None):
            return False
        self.sync_frozen()
        return True

    def _apply(self, fn, recurse=True):
        was_meta = self.rows.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.rows.is_meta:  # to_empty: the index buffers hold garbage, refill them
            rows, cols = self._host_index
            with torch.no_grad():
                self.rows.copy_(rows)
                self.cols.copy_(cols)
                if self.col_rows is not None:
                    self.col_rows.copy_(_complement(rows, self.out_features))
        self._retag()  # a move off the meta device makes new Parameter objects
        _bump_layout_epoch()  # buffers and parameters may be new tensors now
        return out

    def retire(self) -> None:
        """Mark this module as replaced (by :func:`~keystone_kernels.merge`): optimizers refuse its tensors."""
        self.retired = True
        _bump_layout_epoch()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._tag_parameters()

    @property
    def weight(self) -> Tensor:
        """The frozen ``[out, in]`` matrix (read-only view for code that inspects ``module.weight``)."""
        return self.frozen_weight

    @property
    def bias(self) -> Tensor | None:
        return self.frozen_bias

    def keystone_indices(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)``: the keystone row and column indices (int64, CPU), as given to the constructor."""
        return self._host_index

    def keystone_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight_rows, self.weight_cols, self.bias_rows) if p is not None]

    @torch.no_grad()
    def sync_frozen(self, backend: str | None = None) -> None:
        """Scatter the fp32 keystone values into the frozen matrix (rounded to nearest even), with
        ``backend`` (default: the layer's own)."""
        backend = backend or self.backend
        if getattr(self, "_keystone_fsdp", None):  # sharded by keystone_kernels.fully_shard: this rank's rows
            from .fsdp import sync_frozen_local

            sync_frozen_local(self)
        else:
            if self.weight_rows is not None:
                ops.scatter_to_frozen(self.frozen_weight, self.weight_rows.detach(), self.rows, None, backend=backend)
            if self.weight_cols is not None:
                ops.scatter_to_frozen(self.frozen_weight, self.weight_cols.detach(), self.col_rows, self.cols,
                                      backend=backend)
            if self.bias_rows is not None:
                self.frozen_bias.index_copy_(0, self.rows, self.bias_rows.detach().to(self.frozen_bias.dtype))
        self._synced_versions = self._keystone_versions()

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None, masters: bool = False) -> tuple[Tensor, Tensor | None]:
        """``([out, in], [out] or None)`` in ``dtype``: the weight this layer computes with.

        By default the frozen matrix as it is: it holds the keystone values rounded to
        ``frozen_dtype``, exactly what the patched forward used, so a merged model reproduces the
        patched one's outputs. ``masters=True`` writes the fp32 keystone values instead (more
        precise than what was trained through, when ``dtype`` is wider than ``frozen_dtype``).
        """
        self.refresh()  # an edit no forward has seen yet
        dtype = dtype or self.frozen_weight.dtype
        weight = self.frozen_weight.to(dtype, copy=True)
        if not masters:
            bias = None if self.frozen_bias is None else self.frozen_bias.to(dtype, copy=True)
            return weight, bias
        if self.weight_rows is not None:
            weight.index_copy_(0, self.rows, self.weight_rows.to(dtype))
        if self.weight_cols is not None:
            block = weight.index_select(1, self.cols)
            target = slice(None) if self.col_rows is None else self.col_rows
            block[target] = self.weight_cols.to(dtype)
            weight.index_copy_(1, self.cols, block)
        bias = None
        if self.frozen_bias is not None:
            bias = self.frozen_bias.to(dtype, copy=True)
            if self.bias_rows is not None:
                bias.index_copy_(0, self.rows, self.bias_rows.to(dtype))
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., in]`` (fp32 / bf16 / fp16) -> ``[..., out]`` in x's dtype."""
        if not torch.compiler.is_compiling():  # a compiled graph cannot branch on versions: sync_frozen there
            self.refresh()
        return _KeystoneLinearFunction.apply(
            x, self.weight_rows, self.weight_cols, self.bias_rows, self.frozen_weight, self.frozen_bias,
            self.rows, self.col_rows, self.cols, self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={len(self.rows)}, "
                f"cols={len(self.cols)}, frozen_dtype={str(self.frozen_weight.dtype).replace('torch.', '')}, "
                f"backend={self.backend}")

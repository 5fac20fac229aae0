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
"""

from __future__ import annotations

import weakref

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


def find_owner(p: Tensor) -> tuple[KeystoneLinear, str] | None:
    """``(module, attribute)`` of the live KeystoneLinear that holds ``p`` as a keystone tensor, or None.

    O(number of KeystoneLinear modules); the optimizer calls it only for untagged tensors, once per layout.
    """
    for module in list(_live):
        for attr in _KEYSTONE_ATTRS:
            if module._parameters.get(attr) is p:
                return module, attr
    return None


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
        self._tag_parameters()
        if not weight.is_meta:  # a meta weight has no values to sync (load them after to_empty)
            # A one-time copy with the reference ops: a layer is often built on the CPU and moved
            # after (``.to("cuda")``), where the chosen backend (Triton) cannot run yet.
            self.sync_frozen(backend="reference")
        self.register_load_state_dict_pre_hook(_base_keys_to_patched)

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
        group = getattr(self, "_keystone_group", None)  # set by keystone_kernels.fully_shard
        for attr, kind in (("weight_rows", "rows"), ("weight_cols", "cols"), ("bias_rows", "bias")):
            p = getattr(self, attr)
            if p is not None:
                p._keystone_owner = _OwnerRef(self)
                p._keystone_kind = kind
                if group is not None:
                    p._keystone_replicated_group = group

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

    def keystone_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight_rows, self.weight_cols, self.bias_rows) if p is not None]

    @torch.no_grad()
    def sync_frozen(self, backend: str | None = None) -> None:
        """Scatter the fp32 keystone values into the frozen matrix (rounded to nearest even), with
        ``backend`` (default: the layer's own)."""
        backend = backend or self.backend
        if getattr(self, "_keystone_fsdp", None):  # sharded by keystone_kernels.fully_shard: this rank's rows
            from .fsdp import sync_frozen_local

            return sync_frozen_local(self)
        if self.weight_rows is not None:
            ops.scatter_to_frozen(self.frozen_weight, self.weight_rows.detach(), self.rows, None, backend=backend)
        if self.weight_cols is not None:
            ops.scatter_to_frozen(self.frozen_weight, self.weight_cols.detach(), self.col_rows, self.cols,
                                  backend=backend)
        if self.bias_rows is not None:
            self.frozen_bias.index_copy_(0, self.rows, self.bias_rows.detach().to(self.frozen_bias.dtype))

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None, masters: bool = False) -> tuple[Tensor, Tensor | None]:
        """``([out, in], [out] or None)`` in ``dtype``: the weight this layer computes with.

        By default the frozen matrix as it is: it holds the keystone values rounded to
        ``frozen_dtype``, exactly what the patched forward used, so a merged model reproduces the
        patched one's outputs. ``masters=True`` writes the fp32 keystone values instead (more
        precise than what was trained through, when ``dtype`` is wider than ``frozen_dtype``).
        """
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
        return _KeystoneLinearFunction.apply(
            x, self.weight_rows, self.weight_cols, self.bias_rows, self.frozen_weight, self.frozen_bias,
            self.rows, self.col_rows, self.cols, self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={len(self.rows)}, "
                f"cols={len(self.cols)}, frozen_dtype={str(self.frozen_weight.dtype).replace('torch.', '')}, "
                f"backend={self.backend}")

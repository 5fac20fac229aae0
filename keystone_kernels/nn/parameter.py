"""Keystone tensors: the parameter class, its tag back to its layer, and who is told when a layer's memory moves.

A keystone tensor is a :class:`KeystoneParameter` tagged with a weak reference to the
:class:`~keystone_kernels.nn.linear.KeystoneLinear` that owns it and its kind (``"rows"``,
``"cols"``, ``"bias"``; :data:`KIND_ATTRS` names the layer attribute of each). Optimizers find
the frozen weight a tensor writes into through :func:`owner_of`; :func:`kind_of` and :func:`tagged_owner` read
the tag unchecked (for messages and saved layouts), and :func:`tag` is the one writer of it.

What an optimizer caches about a layer (the addresses of its frozen weight, its index tensors,
its keystone tensors living in the optimizer's arenas) goes stale when the layer's tensors move
or go: ``.to()`` / ``.half()``, merge, ``p.data = x``, a frozen buffer replaced, the layer freed.
Two signals say so. A watcher (KeystoneAdamW) registers with each layer it caches
(:func:`watch_layout`) and is told of that layer's changes only (:func:`layout_changed`), so a
move of another model never invalidates it. :func:`layout_epoch`, a global counter bumped on every
change, is for caches that span all layers (the step hooks of other optimizers).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

__all__ = ["KIND_ATTRS", "KEYSTONE_ATTRS", "KeystoneParameter", "OwnerRef", "rebind_data", "layout_epoch",
           "watch_layout", "layout_changed", "register_layer", "has_live_layers", "find_owner", "owner_of", "tag",
           "kind_of", "tagged_owner"]

#: kind of keystone tensor -> the KeystoneLinear attribute that holds it
KIND_ATTRS = {"rows": "weight_rows", "cols": "weight_cols", "bias": "bias_rows"}
KEYSTONE_ATTRS = tuple(KIND_ATTRS.values())

# Bumped by every layout_changed(), of any layer.
_layout_epoch = [0]
_set_data = torch._C.TensorBase.data.__set__  # torch's own ``p.data = t``: no version bump, no epoch bump

# Every live KeystoneLinear, so that the optimizer can tell a keystone tensor that lost its tag (a
# wrapper replaced the parameter object) from a plain parameter: see :func:`find_owner`.
_live: weakref.WeakSet = weakref.WeakSet()
# layer -> the watchers of its layout. Kept beside the layer, not in it: a deepcopy or pickle of
# the layer must not copy its optimizers.
_watchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout_epoch() -> int:
    """A counter that changes whenever any KeystoneLinear's frozen or keystone tensors may have moved."""
    return _layout_epoch[0]


def watch_layout(layer: nn.Module, watcher) -> None:
    """Tell ``watcher.layout_changed(reason: str)`` of every later change of ``layer``'s memory (weakly held)."""
    watchers = _watchers.get(layer)
    if watchers is None:
        watchers = _watchers[layer] = weakref.WeakSet()
    watchers.add(watcher)


def _tell(watchers, reason: str) -> None:
    _layout_epoch[0] += 1
    for watcher in list(watchers or ()):
        watcher.layout_changed(reason)


def layout_changed(layer: nn.Module | None, reason: str) -> None:
    """``layer``'s tensors may have moved or gone (``reason`` says how, for errors): tell its watchers.

    ``layer=None`` (a tensor of no layer) bumps the global epoch only.
    """
    _tell(_watchers.get(layer) if layer is not None else None, reason)


class KeystoneParameter(nn.Parameter):
    """An fp32 keystone tensor of a KeystoneLinear: an ``nn.Parameter`` whose every edit is visible.

    torch's ``p.data`` is an alias with a version counter of its own, so ``p.data.copy_(x)`` would
    change the values without ``p._version`` moving, and the layer could not tell that its frozen
    weight is stale. Here ``p.data`` is ``p.detach()`` (the same memory and the same version
    counter), and assigning ``p.data = x`` bumps the version and tells its layer's layout watchers
    (an optimizer's arena no longer holds the tensor). Everything else is ``nn.Parameter``.
    """

    @property
    def data(self) -> Tensor:
        return self.detach()

    @data.setter
    def data(self, value: Tensor) -> None:
        _set_data(self, value)
        torch.autograd.graph.increment_version(self)
        layout_changed(tagged_owner(self), "a keystone tensor's .data was replaced")

    def __repr__(self) -> str:
        return "KeystoneParameter containing:\n" + repr(self.detach())


def rebind_data(p: Tensor, storage: Tensor) -> None:
    """Point ``p`` at ``storage`` (same shape, dtype and values) without marking it edited.

    For an optimizer that moves keystone tensors into its own arenas: the values do not change, so
    the version does not move and no watcher is told (``p.data = storage`` would do both).
    """
    _set_data(p, storage)


class OwnerRef:
    """A weak reference from a keystone tensor to its KeystoneLinear that survives pickling.

    ``weakref.ref`` itself cannot be pickled, and ``torch.save(model)`` pickles each Parameter with
    its attributes. This one pickles as a dead reference; the layer re-tags its tensors when it is
    unpickled (``KeystoneLinear.__setstate__``).
    """

    __slots__ = ("_ref",)

    def __init__(self, owner=None):
        self._ref = weakref.ref(owner) if owner is not None else None

    def __call__(self):
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return (OwnerRef, ())


def tag(p: Tensor, layer: nn.Module, kind: str) -> None:
    """Tag ``p`` as the ``kind`` (``"rows"``, ``"cols"``, ``"bias"``) keystone tensor of ``layer`` (weakly held)."""
    p._keystone_owner = OwnerRef(layer)
    p._keystone_kind = kind


def kind_of(p: Tensor) -> str | None:
    """The kind ``p`` is tagged with (``"rows"``, ``"cols"``, ``"bias"``), or None for an untagged tensor.

    The tag as it is, unchecked: :func:`owner_of` says whether stepping ``p`` still reaches a live layer.
    """
    return getattr(p, "_keystone_kind", None)


def tagged_owner(p: Tensor) -> nn.Module | None:
    """The layer ``p``'s tag points to, or None (untagged, or the layer was freed); unchecked, as :func:`kind_of`."""
    ref = getattr(p, "_keystone_owner", None)
    return ref() if ref is not None else None


def register_layer(layer: nn.Module) -> None:
    """Count ``layer`` among the live KeystoneLinear modules; its watchers are told when it is freed."""
    _live.add(layer)
    watchers = _watchers.get(layer)
    if watchers is None:
        watchers = _watchers[layer] = weakref.WeakSet()
    weakref.finalize(layer, _tell, watchers, "a KeystoneLinear was freed")


def has_live_layers() -> bool:
    return bool(_live)


def find_owner(p: Tensor) -> tuple[nn.Module, str] | None:
    """``(module, attribute)`` of the live KeystoneLinear that holds ``p`` as a keystone tensor, or None.

    O(number of KeystoneLinear modules); the optimizer calls it only for untagged tensors, once per layout.
    """
    for module in list(_live):
        for attr in KEYSTONE_ATTRS:
            if module._parameters.get(attr) is p:
                return module, attr
    return None


def owner_of(p: Tensor) -> tuple[nn.Module, str] | None:
    """``(layer, kind)`` of the live KeystoneLinear whose keystone tensor ``p`` is, or None for a plain tensor.

    kind is ``"rows"``, ``"cols"`` or ``"bias"``. Raises ValueError, saying what to do, where stepping
    ``p`` would update nothing the model uses: its layer was merged or freed, a wrapper replaced
    the layer's tensor after ``p`` was taken (``p`` is not its layer's any more), or a wrapper
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
    owner = owner_ref()
    if owner is None or owner.retired:
        raise ValueError(
            f"a keystone tensor of shape {tuple(p.shape)} belongs to a KeystoneLinear that was "
            f"{'freed' if owner is None else 'merged'}: stepping it would update nothing the model uses. "
            "Build a new optimizer over keystone_parameters(model) of the live patched model.")
    kind = kind_of(p)
    if owner._parameters.get(KIND_ATTRS[kind]) is not p:
        raise ValueError(
            f"a keystone tensor of shape {tuple(p.shape)} is no longer its module's {KIND_ATTRS[kind]} (a wrapper "
            "such as torch's fully_shard replaced it after the optimizer was built): stepping it would update "
            "nothing the model uses. Shard with keystone_kernels.fully_shard(model) first, then build the optimizer "
            "from keystone_parameters(model).")
    return owner, kind

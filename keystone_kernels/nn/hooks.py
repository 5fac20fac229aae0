"""Any optimizer reaches the model: torch.optim's global step hooks re-scatter the layers it stepped.

Before the step of an optimizer that does not scatter keystone values itself, its keystone layers
are found (cached per optimizer until its param groups or the layout epoch change) and checked:
a tensor of a merged or freed layer, one its layer no longer holds, one that lost its tag, or one
of a layer sharded by ``fully_shard`` raises before anything changes. After the step, each layer
is re-scattered (``sync_frozen``). This catches optimizers that write through raw pointers
(bitsandbytes) or without bumping versions (torch's fused AdamW).

An optimizer opts out by setting ``writes_frozen_weights = True`` (KeystoneAdamW). A wrapper of
another optimizer (accelerate's ``AcceleratedOptimizer``) is skipped too: the wrapped optimizer's
own step runs the hooks.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .parameter import has_live_layers, layout_epoch, owner_of

__all__ = ["install_optimizer_hooks"]

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
            if owner.sharded:
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
    return (getattr(optimizer, "writes_frozen_weights", False)
            or isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer))


# Each hook asks the optimizer first: under torch.compile(opt.step) dynamo traces these hooks, and the
# live-layer set is a WeakSet that the garbage collector may change between a guard's trace and its install.
def _before_any_step(optimizer, args, kwargs) -> None:
    if not _writes_frozen_weights(optimizer) and has_live_layers():
        _layers_of(optimizer)


def _after_any_step(optimizer, args, kwargs) -> None:
    if _writes_frozen_weights(optimizer) or not has_live_layers():
        return
    for ref in _layers_of(optimizer):
        layer = ref()
        if layer is not None:
            layer.sync_frozen()


def install_optimizer_hooks() -> None:
    """Register the global step hooks once (by the first KeystoneLinear, not at import)."""
    if not _hook_handles:
        _hook_handles.append(register_optimizer_step_pre_hook(_before_any_step))
        _hook_handles.append(register_optimizer_step_post_hook(_after_any_step))

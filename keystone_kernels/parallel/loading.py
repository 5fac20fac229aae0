"""Patching before the weights exist: meta-device models, base checkpoints loaded afterwards.

A 70B model cannot be loaded whole to be patched. Instead::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)    # shapes only, no memory
    kk.patch(model, mask)                                    # on the meta device
    kk.fully_shard(model)                                    # optional: FSDP2, still on meta
    kk.load_base_weights(model, "path/to/checkpoint", device="cuda")

:func:`load_base_weights` allocates the model on ``device`` (``to_empty``), re-creates the
non-persistent buffers (rotary ``inv_freq``) with the model's own initialisation, and copies the
base checkpoint in, one safetensors shard at a time: each projection's ``weight`` becomes the
frozen weight (in the frozen dtype) and the fp32 keystone masters, exactly as :func:`patch` makes
them from a loaded model; on a sharded model each rank keeps only its rows. The base fingerprint
that adapters record is computed from the checkpoint as it streams by.

``model.to_empty(device)`` followed by ``model.load_state_dict(base_state_dict)`` works too (a
:class:`KeystoneLinear` accepts the base model's ``weight`` / ``bias`` keys), for a model that is
not sharded; re-create the rotary buffers yourself then.

A model dispatched by accelerate (``device_map`` over several devices, or offloaded) is refused by
:func:`check_not_dispatched` with what to do instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..nn.linear import KeystoneLinear
from ..nn.parameter import layout_changed
from ..ops.dispatch import BACKENDS
from ..state import fingerprint_of, fingerprint_positions, keystone_modules, patch_state
from ..utils.dtensor import copy_into

__all__ = ["load_base_weights", "check_not_dispatched", "meta_backend", "watch_base_load"]


def check_not_dispatched(model: nn.Module) -> None:
    """Raise ValueError for a model whose weights accelerate moves or offloads at run time (``device_map``)."""
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    offloaded = any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())
    if len(devices) > 1 or offloaded or devices & {"disk"}:
        raise ValueError(
            f"this model was dispatched by accelerate (device_map over {sorted(devices)}"
            f"{', with offloaded weights' if offloaded or 'disk' in devices else ''}): its hooks move weights at run "
            "time, and patched projections would not follow them. Load it on one device (device_map=None, or a single "
            "device) and use keystone_kernels.fully_shard(model) for several GPUs; to avoid loading it whole, build it "
            "on the meta device, patch it, then keystone_kernels.load_base_weights(model, checkpoint, device)")


def meta_backend(backend: str | None) -> str:
    """The backend a model patched on the meta device keeps: checked, but resolved on first use on its real device."""
    name = os.environ.get("KEYSTONE_BACKEND") or "auto" if backend is None else backend
    if not isinstance(name, str) or name.strip().lower() not in ("auto",) + BACKENDS:
        raise ValueError(f"{name!r} is not a keystone backend; valid: {', '.join(('auto',) + BACKENDS)}")
    return name.strip().lower()


# ---------------------------------------------------------------------------------------- fingerprint


def watch_base_load(model: nn.Module, state) -> None:
    """Prepare a meta-patched model to compute its base fingerprint while its base weights load.

    Each KeystoneLinear gets the 16 positions :func:`~keystone_kernels.patching.base_fingerprint`
    samples; the load hook keeps the base values there, and once every projection has them the
    fingerprint is set on ``model._keystone`` (it stays "" until then, and ``save_adapter`` refuses).
    """
    modules = [model.get_submodule(p) for p in state.paths]
    shapes = [(m.out_features, m.in_features) for m in modules]
    for module, positions in zip(modules, fingerprint_positions(shapes)):
        module.fingerprint_at = positions
    model.register_load_state_dict_post_hook(_after_load)


def _after_load(model: nn.Module, incompatible=None) -> None:
    """Set the base fingerprint once every projection has seen its base weight (load_state_dict post-hook)."""
    state = getattr(model, "_keystone", None)
    if state is None or state.base_fingerprint:
        return
    modules = [model.get_submodule(p) for p in state.paths]
    samples = [m.fingerprint_sample for m in modules]
    if all(s is not None for s in samples):
        shapes = [(m.out_features, m.in_features) for m in modules]
        state.base_fingerprint = fingerprint_of(state.paths, shapes, samples)


# ---------------------------------------------------------------------------------------- loading


def _shards(source) -> list:
    if isinstance(source, dict):
        return [source]
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no checkpoint at {path} (a state dict, a .safetensors file or a folder of them)")


def _reinit_non_persistent(model: nn.Module) -> None:
    """Re-create buffers that no checkpoint holds (rotary ``inv_freq``) after ``to_empty``.

    Uses the model's own ``_init_weights`` (Transformers) on modules that own non-persistent buffers
    and no parameters, so no weight is re-initialised.
    """
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if isinstance(module, KeystoneLinear) or not module._non_persistent_buffers_set:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            continue
        if init is None:
            raise ValueError(f"{type(module).__name__} has non-persistent buffers that to_empty left uninitialised, "
                             f"and {type(model).__name__} has no _init_weights to re-create them")
        with torch.no_grad():
            init(module)


# a patched layer's tensor -> the base tensor it comes from: the frozen copies, and the keystone tensors of each kind
_BASE_NAMES = {"frozen_weight": "weight", "frozen_bias": "bias",
               **{attr: "bias" if kind == "bias" else "weight" for kind, attr in KeystoneLinear.KIND_ATTRS.items()}}


def _base_name(name: str) -> str:
    """The checkpoint key a patched model's tensor comes from (``q_proj.weight_rows`` -> ``q_proj.weight``)."""
    path, _, attr = name.rpartition(".")
    return f"{path}.{_BASE_NAMES[attr]}" if attr in _BASE_NAMES else name


@torch.no_grad()
def load_base_weights(model: nn.Module, source, device: str | torch.device | None = None) -> nn.Module:
    """Load a base (unpatched) checkpoint into a patched model, allocating it first if it is on meta.

    Args:
        model: a model patched by :func:`~keystone_kernels.patch`, possibly built on the meta device
            and possibly sharded by :func:`~keystone_kernels.fully_shard` (each rank then reads the
            files and keeps its rows: every rank must see them).
        source: a state dict, a ``.safetensors`` file, or a folder of ``.safetensors`` shards (a
            Hugging Face checkpoint folder), with the base model's keys (``...q_proj.weight``).
        device: where to allocate a model that is (partly) on the meta device; required then.

    Returns the model. Raises ValueError for a key the model does not have, a shape that differs,
    or a tensor of the model that no file held (nothing of the model is left uninitialised).
    """
    state = patch_state(model)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        if device is None:
            raise ValueError("the model is on the meta device: pass device= (where to allocate it)")
        model.to_empty(device=torch.device(device))
        _reinit_non_persistent(model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    modules = keystone_modules(model)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded: set[int] = set()
    for shard in _shards(source):
        if isinstance(shard, dict):
            flat = dict(shard)
        else:
            flat = load_file(str(shard))
        for path, module in modules.items():
            if f"{path}.weight" in flat or f"{path}.bias" in flat:
                module.load_base_tensors(flat, f"{path}.")
        for name, value in flat.items():
            target = tensors.get(name)
            if target is None:
                where = "the state dict" if isinstance(shard, dict) else shard
                raise ValueError(f"{name} (in {where}) is not a tensor of this {type(model).__name__}: is it the "
                                 "checkpoint of the same architecture?")
            copy_into(target, value.to(target.dtype), name)
            loaded.add(id(target))
    persistent = model.state_dict(keep_vars=True)
    missing = list(dict.fromkeys(_base_name(n) for n, t in persistent.items() if id(t) not in loaded))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}; they would "
                         "hold uninitialised memory")
    for module in modules.values():
        if isinstance(module, KeystoneLinear):
            module.sync_frozen()  # the frozen copies of the keystone values, from the masters just loaded
            layout_changed(module, "base weights were loaded into it")
    _after_load(model)
    if not state.base_fingerprint:
        raise ValueError("the checkpoint did not hold every projection's weight, so the base fingerprint is unknown")
    return model

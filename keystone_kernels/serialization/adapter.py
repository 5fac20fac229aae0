"""Keystone adapters: only the trained keystone values, the mask and the base model's identity.

File format: safetensors. Tensors ``"<module path>.weight_rows" | ".weight_cols" | ".bias_rows"``
(fp32, the shapes of :class:`KeystoneLinear`'s parameters); metadata ``format``, ``mask`` (the
mask JSON), ``base_model`` (name or path), ``base_fingerprint`` (see
:func:`patching.base_fingerprint`), ``frozen_dtype``, ``train_bias`` and ``checksum``: SHA-256 of
every tensor's name, dtype, shape and bytes and of every other metadata field, verified on load, so
a flipped bit or an edited digit of the mask is an error, not a silently different model
(``keystone-adapter/2`` files covered the tensors only; they load with a warning). Written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .. import arch
from ..mask import KeystoneMask
from ..nn.parameter import KEYSTONE_ATTRS, KIND_ATTRS
from ..state import base_fingerprint, dense_parameters, is_patched, keystone_modules, patch_state
from ..utils.dist import is_main_process
from ..utils.io import atomic_path
from ..utils.peft import base_model_of

ADAPTER_NAME = "keystone_adapter.safetensors"  # the file name beside a merged model or in a Trainer checkpoint
FORMAT = "keystone-adapter/3"
_TENSORS_ONLY_FORMAT = "keystone-adapter/2"  # its checksum covers the tensors, not the metadata: a warning
_LEGACY_FORMATS = ("keystone-adapter/1", _TENSORS_ONLY_FORMAT)  # /1: no checksum at all, loaded with a warning
_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}
_REQUIRED = ("mask", "base_fingerprint", "base_model", "frozen_dtype", "train_bias")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def adapter_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 (hex) of the tensors (:func:`tensors_checksum`) and of every metadata field but ``checksum``."""
    digest = hashlib.sha256(tensors_checksum(tensors).encode())
    for key in sorted(k for k in metadata if k != "checksum"):
        digest.update(f"|{key}={metadata[key]}".encode())
    return digest.hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the keystone values of a patched model to ``path`` (safetensors, atomic).

    Under ``torch.distributed`` only rank 0 writes (keystone values are the same on every rank, also
    on a model sharded by :func:`~keystone_kernels.fully_shard`: nothing to gather); other ranks return.
    """
    model = base_model_of(model)  # a patched PeftModel: the keystone values of its base, under the base's paths
    state = patch_state(model)
    if not state.base_fingerprint:
        raise ValueError("the base fingerprint is unknown: this model was patched on the meta device and its base "
                         "weights were not loaded yet (keystone_kernels.load_base_weights(model, checkpoint, device))")
    if not is_main_process():
        return
    tensors = {}
    train_bias = False
    for name, module in keystone_modules(model).items():
        for attr in KEYSTONE_ATTRS:
            p = getattr(module, attr)
            if p is not None:
                # a copy: p is a view of the optimizer's flat arena, and safetensors refuses shared storage
                tensors[f"{name}.{attr}"] = p.detach().to("cpu", torch.float32, copy=True)
                train_bias |= attr == KIND_ATTRS["bias"] and not module.bias_all
    for name, p in dense_parameters(model).items():  # also_train: whole tensors, so the file is not tiny
        tensors[name] = p.detach().to("cpu", torch.float32, copy=True)
    metadata = {
        "format": FORMAT,
        "mask": json.dumps(state.mask.to_dict()),
        "base_model": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        "base_fingerprint": state.base_fingerprint,
        "frozen_dtype": str(state.frozen_dtype),
        "train_bias": str(train_bias),
    }
    if state.also_train_spec is not None:
        metadata["also_train"] = json.dumps(state.also_train_spec)
    metadata["checksum"] = adapter_checksum(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an adapter file, with its format checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(os.fspath(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    fmt = metadata.get("format")
    if fmt != FORMAT and fmt not in _LEGACY_FORMATS:
        raise ValueError(f"{path} is not a keystone adapter (format {fmt!r}, expected {FORMAT!r})")
    missing = [key for key in _REQUIRED if key not in metadata]
    if missing:
        raise ValueError(f"{path}: the adapter's metadata lacks {', '.join(missing)}; the file was not written by "
                         "keystone_kernels.save_adapter or was edited. Save the adapter again from the trained model.")
    if metadata["frozen_dtype"] not in _DTYPES:
        raise ValueError(f"{path}: metadata frozen_dtype is {metadata['frozen_dtype']!r}; expected one of "
                         f"{', '.join(_DTYPES)}")
    try:
        json.loads(metadata["mask"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the adapter's mask metadata is not valid JSON ({err})") from None
    if fmt == FORMAT:
        if metadata.get("checksum") != adapter_checksum(tensors, metadata):
            raise ValueError(f"{path}: the tensors or the metadata (mask, base fingerprint, dtype, format) do not "
                             "match the adapter's checksum: the file is damaged or was edited. Use an intact copy or "
                             "save the adapter again")
    elif fmt == _TENSORS_ONLY_FORMAT:
        if metadata.get("checksum") != tensors_checksum(tensors):
            raise ValueError(f"{path}: the tensors do not match the adapter's checksum (the file is damaged or was "
                             "edited); use an intact copy or save the adapter again")
        warnings.warn(f"{path} is a {fmt} adapter, whose checksum covers its tensors but not its mask and other "
                      "metadata: an edit there cannot be detected; save it again to cover them", stacklevel=3)
    elif "checksum" in metadata:  # /1 never wrote one: a newer file whose format field was edited to skip the check
        raise ValueError(f"{path} claims format {fmt!r}, which carried no checksum, yet holds one: its format field "
                         f"was edited (a {FORMAT!r} adapter relabelled to skip its check). Use an intact copy or save "
                         "the adapter again")
    else:
        warnings.warn(f"{path} is a {fmt} adapter, written before adapters carried checksums: its values cannot be "
                      "verified; save it again to add one", stacklevel=3)
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype}; keystone adapters hold float32 values")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf values; the training that wrote it diverged. "
                             "Use an earlier checkpoint.")
    return tensors, metadata


@dataclass(frozen=True)
class AdapterFit:
    """What an adapter says to patch a model with: its mask, bias option, frozen dtype and ``also_train``."""

    mask: KeystoneMask
    train_bias: bool
    frozen_dtype: torch.dtype
    also_train: str | list[str] | None


def adapter_fits(model: nn.Module, path: str | os.PathLike, tensors: dict, meta: dict,
                 modules: dict | None = None) -> AdapterFit:
    """What adapter ``path`` (read by :func:`read_adapter`) patches ``model`` with, checked against it.

    A patched model must carry the adapter's mask and base; a plain one must have the adapter's base
    fingerprint, and a model patched with the adapter's settings must have exactly its tensors and
    shapes. ValueError naming ``path`` and the mismatch otherwise. Nothing is changed.
    """
    try:
        also_train = json.loads(meta["also_train"]) if "also_train" in meta else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the adapter's also_train metadata is not valid JSON ({err})") from None
    fit = AdapterFit(KeystoneMask.from_dict(json.loads(meta["mask"])), meta.get("train_bias") == "True",
                     _DTYPES[meta["frozen_dtype"]], also_train)
    if is_patched(model):
        state = patch_state(model)
        if state.base_fingerprint != meta["base_fingerprint"] or state.mask != fit.mask:
            raise ValueError(f"{path}: this patched model has a different base or mask than the adapter "
                             f"(base {meta['base_model']!r}); load it into a fresh base model")
        if state.also_train_spec != fit.also_train:
            raise ValueError(f"{path}: the adapter trained also_train={fit.also_train!r}, this patched model "
                             f"also_train={state.also_train_spec!r}; load it into a fresh base model")
        return fit
    fingerprint = base_fingerprint(model, arch.family_for(model, modules))
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(
            f"{path} was trained on base model {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}); "
            f"this model differs (fingerprint {fingerprint})"
        )
    return fit


def trained_shapes(model: nn.Module) -> dict[str, tuple]:
    """``{adapter tensor name: shape}`` of everything a patched model trains (what :func:`save_adapter` writes)."""
    out = {f"{name}.{attr}": tuple(getattr(m, attr).shape) for name, m in keystone_modules(model).items()
           for attr in KEYSTONE_ATTRS if getattr(m, attr) is not None}
    return out | {name: tuple(p.shape) for name, p in dense_parameters(model).items()}


def check_adapter_tensors(path: str | os.PathLike, tensors: dict, expected: dict[str, tuple]) -> None:
    """ValueError naming ``path`` unless the adapter holds exactly the ``expected`` tensors and shapes."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ValueError(f"{path}: tensors do not match the adapter's mask on this model (first differences: {diff})")


@torch.no_grad()
def fill_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy an adapter's tensors into a patched model's keystone tensors and re-scatter every layer."""
    found = keystone_modules(model)
    dense = dense_parameters(model)
    for name, value in tensors.items():
        path_, _, attr = name.rpartition(".")
        target = getattr(found[path_], attr) if path_ in found and attr in KEYSTONE_ATTRS else dense[name]
        target.copy_(value)
    for module in found.values():
        module.sync_frozen()

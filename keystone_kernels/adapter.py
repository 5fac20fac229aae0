"""Keystone adapters: only the trained keystone values, the mask and the base model's identity.

File format: safetensors. Tensors ``"<module path>.weight_rows" | ".weight_cols" | ".bias_rows"``
(fp32, the shapes of :class:`KeystoneLinear`'s parameters); metadata ``format``, ``mask`` (the
mask JSON), ``base_model`` (name or path), ``base_fingerprint`` (see
:func:`patching.base_fingerprint`), ``frozen_dtype``, ``train_bias``. Written atomically.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import arch
from ._io import atomic_path
from .mask import KeystoneMask
from .patching import _patch_state, base_fingerprint, is_patched, keystone_modules, patch

FORMAT = "keystone-adapter/1"
_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the keystone values of a patched model to ``path`` (safetensors, atomic)."""
    from safetensors.torch import save_file

    state = _patch_state(model)
    tensors = {}
    train_bias = False
    for name, module in keystone_modules(model).items():
        for attr in ("weight_rows", "weight_cols", "bias_rows"):
            p = getattr(module, attr)
            if p is not None:
                # a copy: p is a view of the optimizer's flat arena, and safetensors refuses shared storage
                tensors[f"{name}.{attr}"] = p.detach().to("cpu", torch.float32, copy=True)
                train_bias |= attr == "bias_rows"
    metadata = {
        "format": FORMAT,
        "mask": json.dumps(state.mask.to_dict()),
        "base_model": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        "base_fingerprint": state.base_fingerprint,
        "frozen_dtype": str(state.frozen_dtype),
        "train_bias": str(train_bias),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an adapter file, with its format checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(os.fspath(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a keystone adapter (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, metadata


def _expected_shapes(model: nn.Module, mask: KeystoneMask, modules: dict | None, train_bias: bool) -> dict[str, tuple]:
    shapes = {}
    for key, ind in mask.weight_indices(model, modules).items():
        weight, bias = arch.weight_2d(model, key)
        out, inp = weight.shape
        if len(ind.rows):
            shapes[f"{key}.weight_rows"] = (len(ind.rows), inp)
            if bias is not None and train_bias:
                shapes[f"{key}.bias_rows"] = (len(ind.rows),)
        if len(ind.cols):
            shapes[f"{key}.weight_cols"] = (out - len(ind.rows), len(ind.cols))
    return shapes


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    frozen_dtype: torch.dtype | None = None,
    backend: str | None = "auto",
    modules: dict | None = None,
) -> nn.Module:
    """Apply an adapter to ``model`` (patching it first when needed) and return it.

    A plain base model is checked against the adapter's base fingerprint and patched with the
    adapter's mask (``frozen_dtype`` defaults to the one used in training); a model already patched
    must carry the same mask and base. On any mismatch a ValueError names it and the model is left
    untouched.
    """
    tensors, meta = read_adapter(path)
    mask = KeystoneMask.from_dict(json.loads(meta["mask"]))
    train_bias = meta.get("train_bias") == "True"
    if is_patched(model):
        state = _patch_state(model)
        if state.base_fingerprint != meta["base_fingerprint"] or state.mask != mask:
            raise ValueError(f"{path}: this patched model has a different base or mask than the adapter "
                             f"(base {meta['base_model']!r}); load it into a fresh base model")
    else:
        fingerprint = base_fingerprint(model, arch.family_for(model, modules))
        if fingerprint != meta["base_fingerprint"]:
            raise ValueError(
                f"{path} was trained on base model {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}); "
                f"this model differs (fingerprint {fingerprint})"
            )
        expected = _expected_shapes(model, mask, modules, train_bias)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
            raise ValueError(f"{path}: tensors do not match the adapter's mask on this model (first differences: {diff})")
        frozen_dtype = frozen_dtype or _DTYPES.get(meta.get("frozen_dtype"), torch.bfloat16)
        patch(model, mask, frozen_dtype=frozen_dtype, backend=backend, modules=modules, train_bias=train_bias)
    found = keystone_modules(model)
    with torch.no_grad():
        for name, value in tensors.items():
            path_, _, attr = name.rpartition(".")
            getattr(found[path_], attr).copy_(value)
        for module in found.values():
            module.sync_frozen()
    return model

"""Checks of a saved KeystoneAdamW state before it is loaded: refuse, naming the field, what cannot be trusted.

``KeystoneAdamW.state_dict()`` adds ``"keystone_layout"``: per tensor its kind, shape and its layer's
keystone rows and columns (:func:`describe`). At load, that layout is compared with the
optimizer's own tensors (another mask of the same shapes is refused), and every saved tensor
state and param group is checked: keys, types, shapes, finite values, second moments >= 0, whole
step counts, hyperparameters in range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..nn.parameter import KIND_ATTRS, kind_of, tagged_owner

__all__ = ["LAYOUT_KEY", "describe", "tensor_name", "check_saved_layout", "check_saved_tensor_state",
           "check_saved_group"]

LAYOUT_KEY = "keystone_layout"  # state_dict(): what each tensor is (kind, shape, its layer's rows and columns)
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def describe(p: Tensor) -> dict:
    """What tensor ``p`` is, for ``state_dict()``: its kind and shape, and its layer's rows and columns."""
    owner = tagged_owner(p)
    if owner is None:
        return {"kind": "plain", "shape": list(p.shape)}
    rows, cols = owner.keystone_indices()
    return {"kind": kind_of(p), "shape": list(p.shape), "layer": [owner.out_features, owner.in_features],
            "rows": rows.clone(), "cols": cols.clone()}


def tensor_name(k: int, p: Tensor) -> str:
    kind = kind_of(p)
    what = f"{KIND_ATTRS[kind]} of shape {tuple(p.shape)}" if kind else f"shape {tuple(p.shape)}"
    return f"tensor {k} ({what})"


def _indices_text(t) -> str:
    values = t.tolist() if isinstance(t, Tensor) else list(t)
    return str(values) if len(values) <= 12 else f"{values[:12]}... ({len(values)} in all)"


def check_saved_layout(params: list[Tensor], saved: object) -> None:
    """Refuse a saved layout (``state_dict()[LAYOUT_KEY]``) that describes other tensors than ``params``."""
    if not isinstance(saved, list) or len(saved) != len(params):
        raise ValueError(f"the optimizer state's {LAYOUT_KEY!r} field is not a list of {len(params)} tensor "
                         "descriptions; the file is damaged or was not written by KeystoneAdamW.state_dict()")
    for k, (p, old) in enumerate(zip(params, saved)):
        new = describe(p)
        if not isinstance(old, dict):
            raise ValueError(f"the optimizer state's {LAYOUT_KEY!r} entry {k} is {old!r}, not a tensor description; "
                             "the file is damaged or was not written by KeystoneAdamW.state_dict()")
        for field, here, there in (("shape", tuple(new["shape"]), tuple(old.get("shape", ()))),
                                   ("kind", new["kind"], old.get("kind"))):
            if here != there:
                raise ValueError(f"the optimizer state does not fit: tensor {k} has {field} {here} here, {there} in "
                                 "the saved state; it was saved for another mask or model. Load it into an optimizer "
                                 "over keystone_parameters(model) of the same patched model.")
        for field in ("layer", "rows", "cols"):
            if field not in new:
                continue
            here, there = new[field], old.get(field)
            same = (torch.equal(here, there) if isinstance(here, Tensor) and isinstance(there, Tensor)
                    else list(here) == list(there or ()))
            if not same:
                raise ValueError(
                    f"the optimizer state does not fit: the layer of {tensor_name(k, p)} has keystone {field} "
                    f"{_indices_text(here)} here, {_indices_text(there if there is not None else [])} in the saved "
                    "state, so its moments would drive other weights. It was saved with another mask: load it into a "
                    "model patched with the mask of that run.")


def check_saved_tensor_state(where: str, entry: object, shape: tuple, amsgrad: bool) -> None:
    """Refuse one tensor's saved AdamW state that cannot be trusted, naming the field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: the saved state is a {type(entry).__name__}, not a dict of 'step', 'exp_avg' "
                         "and 'exp_avg_sq'")
    need = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    missing = [name for name in need if name not in entry]
    if missing:
        raise ValueError(f"{where}: the saved state lacks {', '.join(map(repr, missing))} (has "
                         f"{sorted(map(str, entry))}); the file is damaged or was written by another optimizer")
    step = entry["step"]
    if isinstance(step, Tensor):
        step = float(step) if step.numel() == 1 and not step.is_complex() else None
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not (0 <= step < math.inf) \
            or not float(step).is_integer():
        raise ValueError(f"{where}: field 'step' is {entry['step']!r}; it must be a whole number >= 0")
    for name in need[1:]:
        value = entry[name]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ValueError(f"{where}: field {name!r} is {type(value).__name__}"
                             f"{'' if not isinstance(value, Tensor) else ' of ' + str(value.dtype)}, not a float "
                             "tensor")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"the optimizer state does not fit: {where} has shape {shape} here, {tuple(value.shape)} in the saved "
                f"state's {name}; it was saved for another mask or model. Load it into an optimizer over "
                "keystone_parameters(model) of the same patched model.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: field {name!r} holds NaN or Inf values; the run that saved it diverged. Use an "
                             "earlier checkpoint.")
        if name in _SECOND_MOMENTS and bool((value < 0).any()):
            raise ValueError(f"{where}: field {name!r} holds negative values (min {float(value.min()):.3g}); a second "
                             "moment is never negative, so the file is damaged")


def check_saved_group(i: int, group: object) -> None:
    if not isinstance(group, dict) or not isinstance(group.get("params"), list):
        raise ValueError(f"the optimizer state's param group {i} is not a dict with a 'params' list")
    lr, betas = group.get("lr", 0.0), group.get("betas", (0.0, 0.0))
    lr = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    checks = {"lr": isinstance(lr, (int, float)) and 0 <= lr < math.inf,
              "betas": isinstance(betas, (tuple, list)) and len(betas) == 2
              and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)}
    for name in ("eps", "weight_decay"):
        value = group.get(name, 0.0)
        checks[name] = isinstance(value, (int, float)) and 0 <= value < math.inf
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"the optimizer state's param group {i} has an invalid {bad[0]} ({group.get(bad[0])!r}); "
                         "lr, eps and weight_decay must be finite and >= 0, betas two numbers in [0, 1)")

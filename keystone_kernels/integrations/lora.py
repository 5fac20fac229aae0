"""PEFT LoRA beside keystone training: the baseline users would pick, and the two composed.

Two uses:

1. **LoRA as the baseline** (``keystone-kernels sft --mode lora``, ``compare``, ``bench``).
   :func:`add_lora` wraps a model with PEFT LoRA adapters on its decoder projections (q, k, v, o,
   gate, up, down: the matrices keystone training touches). For ``W: [out, in]`` LoRA adds
   ``B A``, ``A: [r, in]``, ``B: [out, r]`` (fp32; ``B`` starts at zero), scaled by ``alpha / r``:
   ``r (in + out)`` trainable weights per projection. :func:`lora_optimizer` builds torch AdamW over
   them, :func:`save_lora` / :func:`load_lora_weights` / :func:`merge_lora` write, restore and fold
   them (a standard PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``).

2. **Composition.** ``keystone_kernels.patch(peft_model, mask)`` (:mod:`keystone_kernels.patching`) puts
   keystone rows / columns on the base model's projections and keeps the PEFT adapters that sit on
   *other* modules (for instance ``LoraConfig(target_modules=["lm_head"])``) trainable; one
   :class:`~keystone_kernels.KeystoneAdamW` steps both sets (:func:`composed_param_groups`).
   A PEFT layer on a decoder projection is refused with a ValueError: keystone patching replaces
   those modules, and the two cannot share one. Build the PeftModel first, then patch it: PEFT
   itself refuses to wrap a ``KeystoneLinear``, and ``get_peft_model`` on a patched model freezes
   the keystone tensors (``KeystoneAdamW`` then raises instead of training nothing).

``save_adapter`` / ``load_adapter`` / ``merge`` accept such a PeftModel and act on its base model
(adapter keys stay the base model's paths); ``peft_model.save_pretrained`` writes the LoRA side.

``peft`` is an optional dependency (``pip install keystone-kernels[peft]``), imported lazily.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .. import arch
from ..nn.parameter import kind_of
from ..state import is_patched, keystone_parameters, projection_paths
from ..utils.peft import is_peft_model, require_peft


def projection_targets(model: nn.Module, modules: dict | None = None) -> list[str]:
    """``target_modules`` for LoRA on exactly the decoder projections of ``model``.

    The short names (``["q_proj", ..., "down_proj"]``, what users write) when they match nothing
    else in the model, otherwise the full module paths.
    """
    paths = projection_paths(model, arch.family_for(model, modules))
    if not paths:
        raise ValueError(f"{type(model).__name__} has no decoder projections (nn.Linear / Conv1D) to put LoRA on")
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    matched = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in short}
    return short if matched == set(paths) else paths


def lora_config(model: nn.Module, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                modules: dict | None = None):
    """``peft.LoraConfig`` on the decoder projections: rank ``r``, ``lora_alpha = alpha`` (default
    ``2 r``), no bias training, ``fan_in_fan_out`` for GPT-2's ``Conv1D``."""
    peft = require_peft()
    if int(r) != r or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    family = arch.family_for(model, modules)
    return peft.LoraConfig(r=int(r), lora_alpha=2 * int(r) if alpha is None else alpha, lora_dropout=dropout,
                           target_modules=projection_targets(model, modules), bias="none", task_type="CAUSAL_LM",
                           fan_in_fan_out=family.conv1d)


def add_lora(model: nn.Module, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
             modules: dict | None = None):
    """Wrap ``model`` with LoRA on its decoder projections; returns the ``peft.PeftModel``.

    ``model`` itself changes in place (PEFT injects the LoRA layers into it and freezes every other
    parameter), so training and evaluating ``model`` trains and evaluates the adapters; the PeftModel
    is remembered on it for :func:`save_lora` / :func:`merge_lora`. Adapters are fp32 (``A: [r, in]``
    Kaiming-uniform, ``B: [out, r]`` zeros), also on a bf16 base.
    """
    peft = require_peft()
    if is_peft_model(model):
        raise ValueError("model is already a PeftModel; add_lora wraps a plain Transformers model")
    if is_patched(model):
        raise ValueError("model is patched by keystone_kernels.patch: LoRA on the same decoder projections as keystone "
                         "training is not supported. Use one of them, or LoRA on other modules: "
                         "get_peft_model(model, LoraConfig(target_modules=['lm_head'])) first, "
                         "then patch(peft_model, mask)")
    peft_model = peft.get_peft_model(model, lora_config(model, r, alpha, dropout, modules))
    object.__setattr__(model, "_keystone_peft", peft_model)  # a plain attribute, not a submodule (no cycle)
    return peft_model


def peft_model_of(model: nn.Module):
    """The PeftModel of ``model`` (itself, or the one :func:`add_lora` attached), else a ValueError."""
    if is_peft_model(model):
        return model
    found = model.__dict__.get("_keystone_peft")
    if found is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters: "
                         "call keystone_kernels.lora.add_lora(model) first")
    return found


def has_lora(model: nn.Module) -> bool:
    return is_peft_model(model) or model.__dict__.get("_keystone_peft") is not None


def lora_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch AdamW over the trainable (LoRA) parameters: ``fused`` on CUDA, ``foreach`` elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: call keystone_kernels.lora.add_lora(model) first")
    kw = {"fused": True} if params[0].device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


def save_lora(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write the LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) to ``folder``;
    ``peft.PeftModel.from_pretrained(base, folder)`` loads it."""
    peft_model_of(model).save_pretrained(os.fspath(folder))


def load_lora_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the adapter weights saved in ``folder`` (by :func:`save_lora`) into ``model``'s LoRA layers."""
    peft = require_peft()
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path}")
    result = peft.set_peft_model_state_dict(peft_model_of(model), load_file(os.fspath(path)))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{path} does not fit this model's LoRA layers (missing {missing[:3]})")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove the LoRA layers; returns the plain base model."""
    base = peft_model_of(model).merge_and_unload()
    base.__dict__.pop("_keystone_peft", None)
    return base


# ------------------------------------------------------------------------------------ composition

def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that are not keystone tensors (PEFT adapters, ``modules_to_save`` copies)."""
    return [p for p in model.parameters() if p.requires_grad and kind_of(p) is None]


def composed_param_groups(model: nn.Module, adapter_lr: float | None = None,
                          adapter_weight_decay: float | None = None) -> list[dict]:
    """Param groups for one :class:`~keystone_kernels.KeystoneAdamW` over a patched PeftModel.

    Group 0: the keystone tensors (scattered into their frozen weights). Group 1, when there are
    any: the other trainable tensors, fp32 (LoRA ``A`` / ``B``), updated with the same AdamW math in
    the same arenas; ``adapter_lr`` / ``adapter_weight_decay`` override the optimizer's defaults.
    """
    groups = [{"params": keystone_parameters(model)}]
    adapters = adapter_parameters(model)
    bad = [tuple(p.shape) for p in adapters if p.dtype != torch.float32]
    if bad:
        raise ValueError(f"KeystoneAdamW steps fp32 tensors; {len(bad)} trainable adapter tensors are not fp32 (first "
                         f"of shape {bad[0]}). Keep PEFT's fp32 adapters (autocast_adapter_dtype=True, the default)")
    if adapters:
        extra = {"lr": adapter_lr} if adapter_lr is not None else {}
        if adapter_weight_decay is not None:
            extra["weight_decay"] = adapter_weight_decay
        groups.append({"params": adapters, **extra})
    return groups

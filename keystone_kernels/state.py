"""The state of a patched model: what patch changed, its keystone layers and tensors, the base fingerprint.

Everything that asks "is this model patched, and how" reads it here: :class:`PatchState` lives on
``model._keystone``; :func:`keystone_modules` / :func:`keystone_parameters` find the layers and
their trainable tensors; :func:`base_fingerprint` identifies the base weights an adapter was
trained on (16 fixed sample positions of every projection, rounded to bf16).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch
from .mask import KeystoneMask
from .nn.linear import KeystoneLinear

__all__ = ["PatchState", "patch_state", "is_patched", "is_sharded", "keystone_modules", "keystone_parameters",
           "dense_parameters", "trainable_parameters", "sync_frozen", "projection_paths", "fingerprint_positions",
           "fingerprint_of", "base_fingerprint"]


@dataclass
class PatchState:
    """What :func:`patch` changed, kept on ``model._keystone`` for merge / save_adapter."""

    mask: KeystoneMask
    frozen_dtype: torch.dtype
    backend: str
    modules: dict | None
    original_dtype: torch.dtype
    base_fingerprint: str
    requires_grad: dict[str, bool] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    #: dense parameters trained beside the keystone tensors (``patch(also_train=...)``): name -> dtype before patching
    also_train: dict[str, torch.dtype] = field(default_factory=dict)
    #: the ``also_train`` argument as given (``"paper"``, a list of names, or None), which adapters record
    also_train_spec: str | list[str] | None = None


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_keystone", None) is not None or any(isinstance(m, KeystoneLinear) for m in model.modules())


def projection_paths(model: nn.Module, family: arch.Family, any_module: bool = False) -> list[str]:
    """Paths of the decoder projections (q, k, v, o, up, down, gate) that are ``nn.Linear`` or GPT-2 ``Conv1D``
    (``any_module``: whatever module sits there, e.g. a PEFT layer wrapping one)."""
    names = [family.q, family.k, family.v, family.o, family.up, family.down, family.gate]
    out = []
    for i, layer in enumerate(arch.layers_of(model, family)):
        for name in dict.fromkeys(n for n in names if n):
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                continue  # e.g. an MoE layer has experts instead of up/down
            if any_module or isinstance(module, nn.Linear) or arch.is_conv1d(module):
                out.append(f"{family.layers}.{i}.{name}")
    return out


def fingerprint_positions(shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 16 (row, column) positions :func:`base_fingerprint` samples in each ``[out, in]`` projection, in order."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, out, (16,), generator=gen), torch.randint(0, inp, (16,), generator=gen))
            for out, inp in shapes]


def fingerprint_of(paths: list[str], shapes: list[tuple[int, int]], samples: list[torch.Tensor]) -> str:
    """The hash of :func:`base_fingerprint` from each projection's path, shape and 16 sampled values (fp32 [16])."""
    h = hashlib.sha256()
    for path, (out, inp), sample in zip(paths, shapes, samples):
        h.update(f"{path}:{out}x{inp}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module, family: arch.Family) -> str:
    """A short hash identifying base weights: 16 fixed sample positions of every projection, as bf16.

    Rounding to bf16 makes an fp32 and a bf16 load of the same base agree; the architecture
    (shapes) is part of the hash.
    """
    paths = projection_paths(model, family)
    weights = [arch.weight_2d(model, path)[0] for path in paths]
    if any(w.is_meta for w in weights):
        raise ValueError("the model is on the meta device, so its base weights cannot be fingerprinted: patch it, then "
                         "load its weights with keystone_kernels.load_base_weights(model, checkpoint, device)")
    shapes = [tuple(w.shape) for w in weights]
    samples = [w.detach()[r.to(w.device), c.to(w.device)].to(torch.bfloat16).float().cpu()
               for w, (r, c) in zip(weights, fingerprint_positions(shapes))]
    return fingerprint_of(paths, shapes, samples)


def keystone_modules(model: nn.Module) -> dict[str, KeystoneLinear]:
    """``{path: KeystoneLinear}`` of every patched projection, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, KeystoneLinear)}


def keystone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable keystone tensors of a patched model (what the optimizer gets)."""
    params = [p for m in keystone_modules(model).values() for p in m.keystone_parameters()]
    if not params:
        raise ValueError("model has no keystone parameters: call keystone_kernels.patch(model, mask) first")
    return params


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the dense parameters trained beside the keystone tensors (``patch(also_train=...)``;
    tied parameters once, under their first name); empty for keystone-only training."""
    state = getattr(model, "_keystone", None)
    if state is None or not state.also_train:
        return {}
    named = dict(model.named_parameters())
    return {name: named[name] for name in state.also_train if name in named}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything a patched model trains: its keystone tensors, then its dense ``also_train`` parameters."""
    dense = list(dense_parameters(model).values())
    keystone = [p for m in keystone_modules(model).values() for p in m.keystone_parameters()]
    if not keystone and not dense:
        raise ValueError("model has no trainable tensors: call keystone_kernels.patch(model, mask) first")
    return keystone + dense


def sync_frozen(model: nn.Module) -> None:
    """Re-scatter every keystone value into its frozen matrix (after editing parameters directly or loading)."""
    for m in keystone_modules(model).values():
        m.sync_frozen()


def patch_state(model: nn.Module) -> PatchState:
    """``model._keystone``: what :func:`~keystone_kernels.patch` changed; ValueError for an unpatched model."""
    state = getattr(model, "_keystone", None)
    if state is None:
        raise ValueError("model is not patched by keystone_kernels.patch")
    return state


def is_sharded(model: nn.Module) -> bool:
    """True when :func:`~keystone_kernels.fully_shard` sharded this model's frozen weights."""
    return any(m.sharded for m in keystone_modules(model).values())

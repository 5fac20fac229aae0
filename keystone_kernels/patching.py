"""patch / merge / load_adapter: turn a Transformers model into a keystone-only trainable one, and back.

``patch(model, mask)`` replaces every projection of every decoder layer (q, k, v, o, gate, up,
down; GPT-2's Conv1D too) by a :class:`KeystoneLinear`: the mask's rows / columns become fp32
parameters, everything else is frozen in ``frozen_dtype``. Every other parameter of the model is
frozen. Projections the mask does not touch are converted too (no trainable tensors), so that they
also store ``frozen_dtype`` and compute in the activations' dtype.

This is the top of the model layers, and the one module that knows PEFT models: a ``PeftModel``
is patched through its base model, its adapters on other modules left trainable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from . import arch, ops
from .mask import KeystoneMask
from .nn.linear import KeystoneLinear
from .nn.parameter import KEYSTONE_ATTRS
from .parallel.ddp import mark_for_ddp, unmark_for_ddp
from .parallel.loading import check_not_dispatched, meta_backend, watch_base_load
from .serialization import export
from .serialization.adapter import (
    adapter_fits,
    check_adapter_tensors,
    fill_adapter,
    read_adapter,
    trained_shapes,
)
from .state import (
    PatchState,
    base_fingerprint,
    is_patched,
    is_sharded,
    keystone_modules,
    patch_state,
    projection_paths,
)
from .utils.peft import base_model_of, is_peft_model, tuner_layer_type

__all__ = ["FROZEN_DTYPES", "patch", "merge", "load_adapter"]

FROZEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def patch(
    model: nn.Module,
    mask: KeystoneMask,
    frozen_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = "auto",
    modules: dict | None = None,
    train_bias: bool = True,
    other_dtype: torch.dtype | None = None,
    also_train: str | Sequence[str] | None = None,
) -> nn.Module:
    """Patch ``model`` in place so that only the mask's weights train; returns the model.

    Args:
        mask: the keystone neurons (validated against the model first).
        frozen_dtype: storage of the frozen projections (bf16 default; fp32 for exact tests).
        backend: op backend for the gradient kernels: "auto", "reference", "triton", "ext", or
            None for ``$KEYSTONE_BACKEND``.
        modules: module names for an architecture outside :data:`arch.FAMILIES`.
        train_bias: train the bias entries of keystone rows (layers with a bias).
        other_dtype: cast the rest (embeddings, norms, lm_head) to this dtype; None leaves them.
        also_train: dense parameters to train beside the keystone tensors, in fp32: ``"paper"`` (the recipe
            the paper's code runs: every parameter except the weights of q, k, v, o, up and down, so
            gate_proj, every norm, the embeddings, lm_head and every bias, the projections' whole biases
            included), or a list of parameter names of the model before patching (a weight or bias of a
            decoder projection the mask does not touch keeps that projection a dense trainable
            ``nn.Linear``). They go to the optimizer with the keystone tensors
            (:func:`~keystone_kernels.state.trainable_parameters`), into the adapter (which then is not
            tiny) and back into ``merge``'s model in their original dtype; tied parameters stay tied.
            With ``also_train`` the mask may be empty (the dense parameters alone train).

    For data parallelism the frozen and index buffers are listed in
    ``model._ddp_params_and_buffers_to_ignore`` (DDP then all-reduces only the keystone gradients;
    see :mod:`keystone_kernels.parallel.ddp`). A model on the meta device is patched without values:
    load its base weights afterwards with :func:`~keystone_kernels.load_base_weights`.

    Raises ValueError, leaving the model untouched, for a mask of another model (missing module,
    index out of range), a model already patched, MoE expert neurons (not patchable yet), mixed
    devices, or an unsupported ``frozen_dtype``.

    A ``peft.PeftModel`` is patched through its base model: keystone on the decoder projections, its
    adapters on other modules (e.g. ``lm_head``) left trainable and in their dtype; a PEFT layer on a
    decoder projection raises a ValueError.
    """
    if is_peft_model(model) and not is_patched(model):
        if also_train is not None:
            raise ValueError("also_train is not supported on a PeftModel: its adapters are already the extra trainable "
                             "parameters. Patch the plain model with also_train, or the PeftModel without it")
        return _patch_peft_model(model, mask, frozen_dtype, backend, modules, train_bias, other_dtype)
    device = _check_patchable(model, mask, frozen_dtype, also_train is not None)
    family = arch.family_for(model, modules)
    indices = mask.weight_indices(model, modules)  # validates the mask against the model
    paths = projection_paths(model, family)
    _check_inside_projections(indices, paths)
    dense, whole_bias = _also_train(model, family, paths, indices, also_train)
    paths = [p for p in paths if f"{p}.weight" not in dense]  # a projection trained dense stays an nn.Linear
    meta = device.type == "meta"  # built without weights: they are loaded after to_empty (see loading.py)
    # The layers keep the backend as asked: "auto" resolves per op and device at each call (a layer moved
    # to the GPU after patching then runs the GPU's choice). The state records what it resolves to here;
    # resolving also refuses, now, an explicit backend that cannot run on this device.
    requested = meta_backend(backend)
    resolved = requested if meta else ops.resolve_backend(backend, device)
    # Build every replacement before changing anything, so a failure leaves the model as it was.
    replacements = _keystone_layers(model, paths, indices, frozen_dtype, requested,
                                    {p: ("all" if p in whole_bias else train_bias) for p in paths})
    param_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    named = dict(model.named_parameters())
    state = PatchState(mask, frozen_dtype, resolved, modules,
                       next(iter(param_dtypes)) if len(param_dtypes) == 1 else torch.float32,
                       "" if meta else base_fingerprint(model, family),
                       {n: p.requires_grad for n, p in named.items()}, paths,
                       {n: named[n].dtype for n in dense},
                       also_train if also_train is None or isinstance(also_train, str) else list(also_train))
    for p in model.parameters():
        p.requires_grad_(False)
    for path, new in replacements.items():
        model.set_submodule(path, new)
    if other_dtype is not None:
        for name, p in model.named_parameters():
            if not name.endswith(KEYSTONE_ATTRS) and name not in dense:
                p.data = p.data.to(other_dtype)
    for name in dense:  # trained in fp32 masters, like the keystone tensors; p.data keeps tied weights tied
        p = named[name]
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    model._keystone = state
    export.install(model)  # save_pretrained / Trainer.save_model write the merged model + the adapter
    mark_for_ddp(model)  # DDP neither broadcasts nor syncs the frozen and index buffers
    if meta:
        watch_base_load(model, state)
    return model


def _check_patchable(model: nn.Module, mask: KeystoneMask, frozen_dtype: torch.dtype, extras: bool) -> torch.device:
    """The one device of ``model``; ValueError for a model that cannot be patched with ``mask``."""
    if is_patched(model):
        raise ValueError("model is already patched: merge(model) first, or patch a fresh model")
    if not isinstance(mask, KeystoneMask):
        raise ValueError(f"mask must be a KeystoneMask, got {type(mask).__name__}")
    if not mask and not extras:
        raise ValueError("mask is empty: nothing would train (pass also_train to train dense parameters alone)")
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of {FROZEN_DTYPES}, got {frozen_dtype}")
    check_not_dispatched(model)
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        raise ValueError(f"model is spread over several devices {sorted(map(str, devices))}; "
                         "move it to one device first")
    return devices.pop()


def _check_inside_projections(indices: dict, paths: list[str]) -> None:
    outside = sorted(set(indices) - set(paths))
    if outside:
        if any(".experts." in k for k in outside):
            raise ValueError(f"patching MoE expert weights is not supported yet (mask touches {outside[0]}); "
                             "use ablate/scale for MoE models, or a mask without expert neurons")
        raise ValueError(f"mask touches weights outside the decoder projections: {outside}")


def _keystone_layers(model: nn.Module, paths: list[str], indices: dict, frozen_dtype: torch.dtype, backend: str,
                     train_bias: dict[str, bool | str]) -> dict[str, KeystoneLinear]:
    """``{path: KeystoneLinear}`` for every projection, built from its current weight (nothing is replaced yet)."""
    empty = torch.empty(0, dtype=torch.int64)
    out = {}
    for path in paths:
        weight, bias = arch.weight_2d(model, path)
        ind = indices.get(path)
        out[path] = KeystoneLinear(weight, bias, ind.rows if ind else empty, ind.cols if ind else empty, frozen_dtype,
                                   backend, train_bias[path], transposed=arch.is_conv1d(model.get_submodule(path)))
    return out


def _also_train(model: nn.Module, family: arch.Family, paths: list[str], indices: dict,
                also_train: str | Sequence[str] | None) -> tuple[list[str], set[str]]:
    """``(dense parameter names, projections whose whole bias trains)`` of ``patch(also_train=...)``.

    ``"paper"``: every parameter but the weights of q, k, v, o, up and down (what the paper's code
    leaves unmasked). A projection weight in the list must be one the mask does not touch; a
    projection bias in the list makes that projection's whole bias a keystone tensor.
    """
    if also_train is None:
        return [], set()
    named = dict(model.named_parameters())
    if isinstance(also_train, str):
        if also_train != "paper":
            raise ValueError(f"also_train must be 'paper' or a list of parameter names, got {also_train!r}")
        masked = {f"{family.layers}.{i}.{name}" for i in range(len(arch.layers_of(model, family)))
                  for name in (family.q, family.k, family.v, family.o, family.up, family.down) if name}
        names = [n for n in named if not (n.endswith(".weight") and n[: -len(".weight")] in masked)]
    else:
        names = list(dict.fromkeys(also_train))
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"also_train names {unknown[:3]}, which are not parameters of {type(model).__name__} "
                             f"(e.g. {list(named)[:3]})")
    projection = set(paths)
    dense, whole_bias = [], set()
    for name in names:
        module, _, attr = name.rpartition(".")
        if module in projection and attr == "bias":
            whole_bias.add(module)
        elif module in projection and module in indices:
            raise ValueError(f"also_train names {name}, a weight the mask already trains rows / columns of; leave it "
                             "to the mask, or take its neurons out of the mask to train it whole")
        else:
            dense.append(name)
    return dense, whole_bias


def _patch_peft_model(peft_model, mask: KeystoneMask, frozen_dtype: torch.dtype, backend: str | None,
                      modules: dict | None, train_bias: bool, other_dtype: torch.dtype | None):
    """:func:`patch` for a ``peft.PeftModel``: keystone on the base projections, PEFT's adapters elsewhere.

    The base model is patched as a plain one would be; the parameters PEFT left trainable (LoRA
    ``A`` / ``B``, ``modules_to_save`` copies) stay trainable and keep their dtype (``other_dtype``
    casts only the frozen rest). Raises ValueError, leaving the model untouched, when a PEFT layer
    wraps a decoder projection. Returns ``peft_model``.
    """
    base = peft_model.get_base_model()
    family = arch.family_for(base, modules)
    tuner = tuner_layer_type()
    wrapped = [p for p in projection_paths(base, family, any_module=True) if isinstance(base.get_submodule(p), tuner)]
    if wrapped:
        kind = type(base.get_submodule(wrapped[0])).__module__.split(".")[-2]
        more = f" (and {len(wrapped) - 1} more)" if len(wrapped) > 1 else ""
        raise ValueError(
            f"cannot patch this PeftModel: a PEFT {kind} layer wraps the decoder projection {wrapped[0]}{more}, which "
            "keystone patching replaces. Supported: PEFT adapters on modules other than the decoder projections (q, k, "
            "v, o, gate, up, down), e.g. get_peft_model(model, LoraConfig(target_modules=['lm_head'])), with keystone "
            "rows / columns on the projections; or LoRA alone (keystone_kernels.integrations.lora.add_lora, sft "
            "--mode lora); or keystone alone (patch the plain model).")
    adapters = [p for p in base.parameters() if p.requires_grad]
    patch(base, mask, frozen_dtype=frozen_dtype, backend=backend, modules=modules, train_bias=train_bias)
    keep = {id(p) for p in adapters}
    for p in adapters:
        p.requires_grad_(True)  # patch froze everything; PEFT's trainable set is the user's choice
    if other_dtype is not None:
        for name, p in base.named_parameters():
            if id(p) not in keep and not name.endswith(KEYSTONE_ATTRS):
                p.data = p.data.to(other_dtype)
    return peft_model


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype | None = None, masters: bool = False) -> nn.Module:
    """Turn a patched model back into a plain one, in place, with the trained keystone values.

    Each KeystoneLinear becomes an ``nn.Linear`` (or ``Conv1D``) holding, in ``dtype`` (default: the
    model's dtype before patching), the weight the patched model computed with: the frozen matrix
    with the keystone values rounded to ``frozen_dtype``, so the merged model's outputs equal the
    patched model's. ``masters=True`` writes the fp32 keystone masters instead.
    ``requires_grad`` flags are restored. ``save_pretrained`` / ``from_pretrained`` then work as usual.
    A patched ``peft.PeftModel`` is merged in its base model; its adapters stay.
    """
    model_in, model = model, base_model_of(model)
    state = patch_state(model)
    if is_sharded(model):
        raise ValueError("merge works in place on a whole model; this one is sharded by keystone_kernels.fully_shard "
                         "(a merged copy would need every weight on every rank). Use keystone_kernels.save_merged("
                         "model, path) on every rank: it gathers one tensor at a time, and rank 0 writes")
    dtype = dtype or state.original_dtype
    for path, module in keystone_modules(model).items():
        model.set_submodule(path, _plain_module(module, *module.merged_weight(dtype, masters=masters)))
        module.retire()
    named = dict(model.named_parameters())
    for name, original in state.also_train.items():  # the dense extras go back to the dtype they had
        if name in named and named[name].dtype != original:
            named[name].data = named[name].data.to(original)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    del model._keystone
    export.uninstall(model)
    unmark_for_ddp(model)
    return model_in


def _plain_module(module: KeystoneLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The ``nn.Linear`` (or GPT-2 ``Conv1D``) that computes what ``module`` does, holding ``weight`` / ``bias``."""
    if module.transposed:
        from transformers.pytorch_utils import Conv1D  # GPT-2 only; transformers costs seconds to import

        plain = Conv1D(module.out_features, module.in_features)
        plain.weight = nn.Parameter(weight.t().contiguous())
    else:
        plain = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        plain.weight = nn.Parameter(weight)
    if bias is not None:
        plain.bias = nn.Parameter(bias)
    return plain


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
    untouched. A ``PeftModel`` is checked and filled through its base model.
    """
    tensors, meta = read_adapter(path)
    base = base_model_of(model)
    fits = adapter_fits(base, path, tensors, meta, modules)
    if is_patched(base):
        check_adapter_tensors(path, tensors, trained_shapes(base))
    else:
        check_adapter_tensors(path, tensors, planned_shapes(base, fits.mask, modules, fits.train_bias, fits.also_train))
        patch(model, fits.mask, frozen_dtype=frozen_dtype or fits.frozen_dtype, backend=backend, modules=modules,
              train_bias=fits.train_bias, also_train=fits.also_train)
    fill_adapter(base, tensors)
    return model


def planned_shapes(model: nn.Module, mask: KeystoneMask, modules: dict | None = None, train_bias: bool = True,
                   also_train: str | Sequence[str] | None = None) -> dict[str, tuple]:
    """``{name: shape}`` of the tensors ``patch(model, mask, ...)`` would make trainable, without patching: the
    keystone tensors (``<path>.weight_rows`` / ``.weight_cols`` / ``.bias_rows``) and the ``also_train`` ones."""
    family = arch.family_for(model, modules)
    indices = mask.weight_indices(model, modules)
    paths = projection_paths(model, family)
    dense, whole_bias = _also_train(model, family, paths, indices, also_train)
    named = dict(model.named_parameters())
    shapes = {name: tuple(named[name].shape) for name in dense}
    for key in paths:
        if f"{key}.weight" in dense:
            continue
        weight, bias = arch.weight_2d(model, key)
        empty = torch.empty(0, dtype=torch.int64)
        rows, cols = (indices[key].rows, indices[key].cols) if key in indices else (empty, empty)
        meta_bias = None if bias is None else torch.empty(weight.shape[0], device="meta")
        values = KeystoneLinear.keystone_values(torch.empty(tuple(weight.shape), device="meta"), meta_bias, rows, cols,
                                                "all" if key in whole_bias else bool(train_bias))
        shapes.update({f"{key}.{attr}": tuple(t.shape) for attr, t in values.items()})
    return shapes

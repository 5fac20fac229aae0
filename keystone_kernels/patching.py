"""patch / merge: turn a Transformers model into a keystone-only trainable one, and back.

``patch(model, mask)`` replaces every projection of every decoder layer (q, k, v, o, gate, up,
down; GPT-2's Conv1D too) by a :class:`KeystoneLinear`: the mask's rows / columns become fp32
parameters, everything else is frozen in ``frozen_dtype``. Every other parameter of the model is
frozen. Projections the mask does not touch are converted too (no trainable tensors), so that they
also store ``frozen_dtype`` and compute in the activations' dtype.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch, distributed, export, ops
from .linear import KeystoneLinear
from .mask import KeystoneMask

FROZEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_keystone", None) is not None or any(isinstance(m, KeystoneLinear) for m in model.modules())


def _projection_paths(model: nn.Module, family: arch.Family) -> list[str]:
    names = [family.q, family.k, family.v, family.o, family.up, family.down, family.gate]
    out = []
    for i, layer in enumerate(arch.layers_of(model, family)):
        for name in dict.fromkeys(n for n in names if n):
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                continue  # e.g. an MoE layer has experts instead of up/down
            if isinstance(module, nn.Linear) or arch.is_conv1d(module):
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
    paths = _projection_paths(model, family)
    weights = [arch.weight_2d(model, path)[0] for path in paths]
    if any(w.is_meta for w in weights):
        raise ValueError("the model is on the meta device, so its base weights cannot be fingerprinted: patch it, then "
                         "load its weights with keystone_kernels.load_base_weights(model, checkpoint, device)")
    shapes = [tuple(w.shape) for w in weights]
    samples = [w.detach()[r.to(w.device), c.to(w.device)].to(torch.bfloat16).float().cpu()
               for w, (r, c) in zip(weights, fingerprint_positions(shapes))]
    return fingerprint_of(paths, shapes, samples)


def patch(
    model: nn.Module,
    mask: KeystoneMask,
    frozen_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = "auto",
    modules: dict | None = None,
    train_bias: bool = True,
    other_dtype: torch.dtype | None = None,
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

    For data parallelism the frozen and index buffers are listed in
    ``model._ddp_params_and_buffers_to_ignore`` (DDP then all-reduces only the keystone gradients;
    see :mod:`keystone_kernels.distributed`). A model on the meta device is patched without values:
    load its base weights afterwards with :func:`~keystone_kernels.load_base_weights`.

    Raises ValueError, leaving the model untouched, for a mask of another model (missing module,
    index out of range), a model already patched, MoE expert neurons (not patchable yet), mixed
    devices, or an unsupported ``frozen_dtype``.

    A ``peft.PeftModel`` is patched through its base model: keystone on the decoder projections, its
    adapters on other modules (e.g. ``lm_head``) left trainable; a PEFT layer on a decoder projection
    raises a ValueError (see :func:`keystone_kernels.lora.patch_peft_model`).
    """
    from .lora import is_peft_model

    if is_peft_model(model) and not is_patched(model):
        from .lora import patch_peft_model

        return patch_peft_model(model, mask, frozen_dtype, backend, modules, train_bias, other_dtype)
    if is_patched(model):
        raise ValueError("model is already patched: merge(model) first, or patch a fresh model")
    if not isinstance(mask, KeystoneMask):
        raise ValueError(f"mask must be a KeystoneMask, got {type(mask).__name__}")
    if not mask:
        raise ValueError("mask is empty: nothing would train")
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be one of {FROZEN_DTYPES}, got {frozen_dtype}")
    from .loading import check_not_dispatched, meta_backend, watch_base_load

    check_not_dispatched(model)
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        raise ValueError(f"model is spread over several devices {sorted(map(str, devices))}; "
                         "move it to one device first")
    device = devices.pop()
    family = arch.family_for(model, modules)
    indices = mask.weight_indices(model, modules)  # validates the mask against the model
    paths = _projection_paths(model, family)
    outside = sorted(set(indices) - set(paths))
    if outside:
        if any(".experts." in k for k in outside):
            raise ValueError(f"patching MoE expert weights is not supported yet (mask touches {outside[0]}); "
                             "use ablate/scale for MoE models, or a mask without expert neurons")
        raise ValueError(f"mask touches weights outside the decoder projections: {outside}")
    meta = device.type == "meta"  # built without weights: they are loaded after to_empty (see loading.py)
    resolved = meta_backend(backend) if meta else ops.resolve_backend(backend, device)
    param_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    fingerprint = "" if meta else base_fingerprint(model, family)
    empty = torch.empty(0, dtype=torch.int64)

    # Build every replacement before changing anything, so a failure leaves the model as it was.
    replacements = {}
    for path in paths:
        module = model.get_submodule(path)
        weight, bias = arch.weight_2d(model, path)
        ind = indices.get(path)
        replacements[path] = KeystoneLinear(
            weight, bias, ind.rows if ind else empty, ind.cols if ind else empty, frozen_dtype, resolved, train_bias,
            transposed=arch.is_conv1d(module),
        )
    state = PatchState(mask, frozen_dtype, resolved, modules,
                       next(iter(param_dtypes)) if len(param_dtypes) == 1 else torch.float32,
                       fingerprint, {n: p.requires_grad for n, p in model.named_parameters()}, paths)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, new in replacements.items():
        model.set_submodule(path, new)
    if other_dtype is not None:
        for name, p in model.named_parameters():
            if not name.endswith(("weight_rows", "weight_cols", "bias_rows")):
                p.data = p.data.to(other_dtype)
    model._keystone = state
    export.install(model)  # save_pretrained / Trainer.save_model write the merged model + the adapter
    distributed.mark_for_ddp(model)  # DDP neither broadcasts nor syncs the frozen and index buffers
    if meta:
        watch_base_load(model, state)
    return model


def keystone_modules(model: nn.Module) -> dict[str, KeystoneLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KeystoneLinear)}


def keystone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable keystone tensors of a patched model (what the optimizer gets)."""
    params = [p for m in keystone_modules(model).values() for p in m.keystone_parameters()]
    if not params:
        raise ValueError("model has no keystone parameters: call keystone_kernels.patch(model, mask) first")
    return params


def sync_frozen(model: nn.Module) -> None:
    """Re-scatter every keystone value into its frozen matrix (after editing parameters directly or loading)."""
    for m in keystone_modules(model).values():
        m.sync_frozen()


def _patch_state(model: nn.Module) -> PatchState:
    state = getattr(model, "_keystone", None)
    if state is None:
        raise ValueError("model is not patched by keystone_kernels.patch")
    return state


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
    from .lora import base_model_of

    model_in, model = model, base_model_of(model)
    state = _patch_state(model)
    from .fsdp import is_sharded

    if is_sharded(model):
        raise ValueError("merge works in place on a whole model; this one is sharded by keystone_kernels.fully_shard "
                         "(a merged copy would need every weight on every rank). Use keystone_kernels.save_merged("
                         "model, path) on every rank: it gathers one tensor at a time, and rank 0 writes")
    dtype = dtype or state.original_dtype
    for path, module in keystone_modules(model).items():
        weight, bias = module.merged_weight(dtype, masters=masters)
        if module.transposed:
            from transformers.pytorch_utils import Conv1D

            plain = Conv1D(module.out_features, module.in_features)
            plain.weight = nn.Parameter(weight.t().contiguous())
            if bias is not None:
                plain.bias = nn.Parameter(bias)
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            plain.weight = nn.Parameter(weight)
            if bias is not None:
                plain.bias = nn.Parameter(bias)
        model.set_submodule(path, plain)
        module.retire()
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    del model._keystone
    export.uninstall(model)
    distributed.unmark_for_ddp(model)
    return model_in

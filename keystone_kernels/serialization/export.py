"""Saving a patched model so that plain ``from_pretrained`` loads the model that was trained.

``patch`` gives the model an instance-level ``save_pretrained`` (:class:`SavePretrainedMerged`):
what ``model.save_pretrained``, ``Trainer.save_model`` and TRL's ``SFTTrainer.save_model`` write is
the merged plain model (the weights the patched model computes with, in the dtype it had before
patching, the model itself unchanged) plus ``keystone_adapter.safetensors`` beside it. Without
this, they would write the patched state dict (``frozen_weight``, ``weight_rows`` ...), which
``from_pretrained`` "loads" with every projection left at random initialisation.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..state import is_sharded, keystone_modules, patch_state
from ..utils.dist import is_main_process
from ..utils.dtensor import full_tensor
from .adapter import ADAPTER_NAME, save_adapter

__all__ = ["merged_state_dict", "SavePretrainedMerged", "install", "uninstall"]


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None, masters: bool = False) -> dict[str, Tensor]:
    """The state dict of the plain model that :func:`~keystone_kernels.merge` would make, without merging.

    Each KeystoneLinear's entries are replaced by ``<path>.weight`` (``[out, in]``, or ``[in, out]``
    for GPT-2 ``Conv1D``) and ``<path>.bias`` in ``dtype`` (default: the model's dtype before
    patching): the frozen matrix as the patched model computes with it, or with ``masters=True`` the
    fp32 keystone values written in. Other tensors keep their dtype.

    A model sharded by :func:`~keystone_kernels.fully_shard` is gathered one tensor at a time (every
    rank must call this, in step), onto rank 0's CPU only: the other ranks get an empty dict, so the
    CPU memory is one model's, on one rank.
    """
    state = patch_state(model)
    dtype = dtype or state.original_dtype
    sharded = is_sharded(model)
    keep = is_main_process() or not sharded
    modules = keystone_modules(model)
    prefixes = tuple(f"{path}." for path in modules)
    out: dict[str, Tensor] = {}
    for path, module in modules.items():
        weight = full_tensor(module.frozen_weight)
        bias = None if module.frozen_bias is None else full_tensor(module.frozen_bias)
        if not keep:
            continue
        if sharded:
            weight, bias = weight.cpu(), None if bias is None else bias.cpu()
        weight, bias = module.merged_weight(dtype, masters=masters, weight=weight, bias=bias)
        out[f"{path}.weight"] = weight.t().contiguous() if module.transposed else weight
        if bias is not None:
            out[f"{path}.bias"] = bias
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefixes):
            continue
        full = full_tensor(t.detach())
        if keep:
            out[name] = full.cpu().clone() if sharded else full
    return out if keep else {}


class SavePretrainedMerged:
    """``model.save_pretrained`` of a patched model: the merged plain model plus the keystone adapter.

    A callable object rather than a bound method, so that a patched model still deep-copies and
    pickles.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, state_dict=None, **kwargs):
        model = self.model
        if is_sharded(model):
            raise ValueError("this model is sharded by keystone_kernels.fully_shard: call keystone_kernels."
                             "save_merged(model, path) on every rank (it gathers the shards; rank 0 writes)")
        type(model).save_pretrained(model, save_directory, *args, state_dict=merged_state_dict(model), **kwargs)
        save_adapter(model, os.path.join(os.fspath(save_directory), ADAPTER_NAME))


def install(model: nn.Module) -> None:
    """Give a patched Hugging Face model (one with ``save_pretrained``) the merged save."""
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = SavePretrainedMerged(model)


def uninstall(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), SavePretrainedMerged):
        del model.save_pretrained

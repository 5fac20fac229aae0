"""FSDP2 for patched models: frozen weights sharded by rows, keystone tensors replicated.

A model too large for one GPU keeps only ``1/N`` of its frozen weights per rank, while the keystone
tensors (a fraction of a percent of the weights) stay whole on every rank:

1. :func:`fully_shard` turns each :class:`KeystoneLinear`'s ``frozen_weight`` (and ``frozen_bias``)
   buffer into a frozen ``nn.Parameter`` (``requires_grad=False``), so that torch's FSDP2 shards it
   row-wise (``Shard(0)``) like any parameter, all-gathers it for the layer's forward and backward
   and frees it after. The row / column index buffers stay whole on every rank (int64, |R| + |C| +
   (out - |R|) entries per layer).
2. It calls ``torch.distributed.fsdp.fully_shard`` on every decoder layer and then on the root,
   with ``ignored_params`` = every trainable tensor (the keystone tensors and anything else with
   ``requires_grad``): FSDP2 leaves them plain and replicated, and reduces no gradient at all (no
   managed parameter has one).
3. Each replicated trainable tensor is tagged with the mesh's process group. :class:`KeystoneAdamW`
   then all-reduces each group's flat fp32 gradient arena once per step (one collective for all
   keystone gradients: 4 bytes per keystone value), updates every master identically on every
   rank, and writes into each frozen weight only the rows of this rank's shard
   (``KeystoneLinear.sync_frozen`` of a layer marked ``sharded``).

Saving: keystone values are replicated, so :func:`~keystone_kernels.save_adapter` needs no gather
(rank 0 writes). A merged model is gathered one tensor at a time by :func:`save_merged` (every rank
calls it; rank 0 holds the full state dict on the CPU and writes it). ``merge`` in place is refused
on a sharded model: FSDP2 owns its modules, and a merged copy would need the whole model on every
rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .. import arch
from ..nn.linear import KeystoneLinear
from ..serialization.adapter import ADAPTER_NAME, save_adapter
from ..serialization.export import merged_state_dict
from ..state import is_sharded, keystone_modules, patch_state
from ..utils.dist import REPLICA_GROUP_ATTR, GroupTag, is_main_process
from ..utils.io import atomic_dir

__all__ = ["fully_shard", "reshard", "save_merged"]

_FROZEN = ("frozen_weight", "frozen_bias")


def _frozen_as_parameters(module: KeystoneLinear) -> None:
    """Re-register the frozen buffers as frozen parameters (FSDP2 shards parameters, not buffers)."""
    for name in _FROZEN:
        t = module._buffers.get(name)
        if t is None:
            continue
        del module._buffers[name]
        # row-major: FSDP2 shards contiguous parameters only, by rows (a column-owned layer's column-major
        # storage, KeystoneLinear.frozen_storage, goes back to row-major when it is sharded)
        module.register_parameter(name, nn.Parameter(t.contiguous(), requires_grad=False))


def fully_shard(model: nn.Module, mesh=None, **fsdp_kwargs) -> nn.Module:
    """Shard a patched model with FSDP2: frozen weights 1/N per rank, keystone tensors replicated.

    Args:
        model: a model patched by :func:`~keystone_kernels.patch` (on the meta device, on the CPU, or
            on this rank's GPU), inside an initialised process group.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks, on cuda when available, else cpu).
        fsdp_kwargs: passed to ``torch.distributed.fsdp.fully_shard`` (``reshard_after_forward``,
            ``mp_policy``, ``offload_policy``, ...). ``ignored_params`` is added to, not replaced.

    Returns the model (its class becomes FSDP2's ``FSDP<Class>``, as with torch's ``fully_shard``).
    Build :class:`~keystone_kernels.KeystoneAdamW` from ``keystone_parameters(model)`` afterwards;
    it all-reduces the keystone gradients itself (every rank must call ``step()``).

    Raises ValueError for a model that is not patched or already sharded, a mesh that is not 1-D,
    and a ``shard_placement_fn`` (rows are the only sharding the optimizer's scatter follows).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    state = patch_state(model)
    if is_sharded(model):
        raise ValueError("model is already sharded by keystone_kernels.fully_shard")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fully_shard needs a process group: run under torchrun and call torch.distributed."
                         "init_process_group() (or keystone_kernels.utils.dist.init_from_env()) first")
    if "shard_placement_fn" in fsdp_kwargs:
        raise ValueError("shard_placement_fn is not supported: KeystoneAdamW writes the rows of each rank's shard, "
                         "so frozen weights must be sharded by rows (FSDP2's default Shard(0))")
    if mesh is None:
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"fully_shard takes a 1-D device mesh (data parallel), got {mesh.ndim} dimensions; "
                         "for HSDP or tensor parallelism shard the model with torch directly")
    group = mesh.get_group()
    modules = keystone_modules(model)
    for module in modules.values():
        _frozen_as_parameters(module)
    replicated = {p for p in model.parameters() if p.requires_grad}
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ()) | replicated
    family = arch.family_for(model, state.modules)
    for layer in arch.layers_of(model, family):
        torch_fully_shard(layer, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    torch_fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    tag = GroupTag(group)
    for p in replicated:
        setattr(p, REPLICA_GROUP_ATTR, tag)
    taken = _frozen_taken_by_fsdp(model)
    for path, module in modules.items():
        missing = [n for n in _FROZEN if getattr(module, n) is not None and (id(module), n) not in taken]
        if missing:
            raise RuntimeError(f"FSDP2 did not take {path}.{missing[0]} as a sharded parameter")
        module.mark_sharded(tag)  # re-tags its tensors when they are replaced too (to_empty after meta)
    return model


def _frozen_taken_by_fsdp(model: nn.Module) -> set[tuple[int, str]]:
    """``(id(KeystoneLinear), "frozen_weight" / "frozen_bias")`` of every frozen tensor an FSDP2 group manages."""
    from torch.distributed.fsdp import FSDPModule

    out: set[tuple[int, str]] = set()
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        for fsdp_param in (group.fsdp_params if group is not None else ()):
            info = fsdp_param._module_info
            if isinstance(info.module, KeystoneLinear) and info.param_name in _FROZEN:
                out.add((id(info.module), info.param_name))
    return out


def reshard(model: nn.Module) -> None:
    """Free every unsharded weight FSDP2 still holds, so that edits of the shards are what the next forward sees."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def save_merged(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                masters: bool = False) -> None:
    """Write the merged plain model (``from_pretrained`` loads it) from a sharded or plain patched model.

    Every rank must call it (the frozen weights are gathered one tensor at a time); rank 0 writes
    ``path`` with ``save_pretrained`` (atomic folder replace), with the keystone adapter beside it as
    ``model.save_pretrained`` of a patched model does, and the others write nothing. The model
    itself stays patched and sharded, so training can go on. ``dtype`` and ``masters`` as for ``merge``.
    """
    state_dict = merged_state_dict(model, dtype, masters)
    if not is_main_process():
        return
    with atomic_dir(path) as tmp:
        # the class's save_pretrained: the instance's (export.SavePretrainedMerged) cannot gather shards
        type(model).save_pretrained(model, tmp, state_dict=state_dict)
        save_adapter(model, os.path.join(tmp, ADAPTER_NAME))

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
   rank, and writes into each frozen weight only the rows of this rank's shard (:class:`ReplicaSync`).

Saving: keystone values are replicated, so :func:`~keystone_kernels.save_adapter` needs no gather
(rank 0 writes). A merged model is gathered one tensor at a time by :func:`save_merged` (every rank
calls it; rank 0 holds the full state dict on the CPU and writes it). ``merge`` in place is refused
on a sharded model: FSDP2 owns its modules, and a merged copy would need the whole model on every
rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import arch, ops
from .linear import KeystoneLinear

__all__ = ["fully_shard", "is_sharded", "ReplicaSync", "bucket_sync", "sync_frozen_local", "scaled_shards",
           "save_merged", "gather_merged_state_dict"]

_FROZEN = ("frozen_weight", "frozen_bias")


class GroupTag:
    """The process group a replicated tensor's gradient is averaged over, as an attribute of the tensor.

    Pickles as no group: ``torch.save`` of a model or tensor carries attributes, and a process group
    cannot be pickled (nor would it mean anything in another process).
    """

    __slots__ = ("group",)

    def __init__(self, group=None):
        self.group = group

    def __reduce__(self):
        return (GroupTag, ())
_GROUP_ATTR = "_keystone_replicated_group"  # on replicated trainable tensors: the group their grads reduce over


def is_sharded(model: nn.Module) -> bool:
    """True when :func:`fully_shard` sharded this model's frozen weights."""
    return any(getattr(m, "_keystone_fsdp", None) for m in model.modules() if isinstance(m, KeystoneLinear))


def _frozen_as_parameters(module: KeystoneLinear) -> None:
    """Re-register the frozen buffers as frozen parameters (FSDP2 shards parameters, not buffers)."""
    for name in _FROZEN:
        t = module._buffers.get(name)
        if t is None:
            continue
        del module._buffers[name]
        module.register_parameter(name, nn.Parameter(t, requires_grad=False))


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
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    from .patching import _patch_state, keystone_modules

    state = _patch_state(model)
    if is_sharded(model):
        raise ValueError("model is already sharded by keystone_kernels.fully_shard")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fully_shard needs a process group: run under torchrun and call torch.distributed."
                         "init_process_group() (or keystone_kernels.distributed.init_from_env()) first")
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
        setattr(p, _GROUP_ATTR, tag)
    owners = _fsdp_params_by_owner(model)
    for path, module in modules.items():
        found = owners.get(id(module), {})
        missing = [n for n in _FROZEN if getattr(module, n) is not None and n not in found]
        if missing:
            raise RuntimeError(f"FSDP2 did not take {path}.{missing[0]} as a sharded parameter")
        module._keystone_fsdp = found
        module._keystone_group = tag  # re-tags its tensors if they are replaced (to_empty after meta)
    return model


def _fsdp_params_by_owner(model: nn.Module) -> dict[int, dict[str, object]]:
    """id(KeystoneLinear) -> {"frozen_weight": FSDPParam, "frozen_bias": FSDPParam} over every FSDP2 group."""
    from torch.distributed.fsdp import FSDPModule

    out: dict[int, dict[str, object]] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        for fsdp_param in (group.fsdp_params if group is not None else ()):
            info = fsdp_param._module_info
            if isinstance(info.module, KeystoneLinear) and info.param_name in _FROZEN:
                out.setdefault(id(info.module), {})[info.param_name] = fsdp_param
    return out


# ---------------------------------------------------------------------------------------- optimizer side


@dataclass
class _LocalPart:
    """Rows ``[i0, i1)`` of keystone tensor k live in this rank's shard of its frozen weight."""

    k: int
    i0: int
    i1: int
    fsdp_param: object  # torch FSDPParam: .sharded_param is the current sharded DTensor
    rows: Tensor  # int64 [i1 - i0]: rows in the local shard
    cols: Tensor | None
    bias: bool

    def local_target(self) -> Tensor:
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        if self.fsdp_param.sharded_state != ShardedState.SHARDED:
            raise RuntimeError("KeystoneAdamW.step() ran while FSDP2 held a layer's frozen weight unsharded (between "
                               "forward and backward?); step after backward, when FSDP2 has resharded every layer")
        local = self.fsdp_param.sharded_param.to_local()
        return local.view(-1, 1) if self.bias else local


def _row_range(fsdp_param) -> tuple[int, int]:
    """[lo, hi): the global rows of the frozen weight held by this rank (FSDP2's torch.chunk split)."""
    from torch.distributed.tensor import Shard

    param = fsdp_param.sharded_param
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"frozen weights must be sharded by rows (Shard(0)), got {param.placements}")
    out = param.shape[0]
    world = param.device_mesh.size()
    chunk = -(-out // world)
    lo = min(out, param.device_mesh.get_local_rank() * chunk)
    hi = lo + param.to_local().shape[0]
    if hi > out or hi - lo > chunk:
        raise RuntimeError(f"unexpected FSDP2 shard: rows [{lo}, {hi}) of {out} on {world} ranks")
    return lo, hi


def local_parts(k: int, p: Tensor, device: torch.device) -> list[_LocalPart]:
    """The part of keystone tensor ``p`` (position k in its bucket) that this rank scatters, or []."""
    owner: KeystoneLinear = p._keystone_owner()
    kind = p._keystone_kind
    fsdp_param = owner._keystone_fsdp["frozen_bias" if kind == "bias" else "frozen_weight"]
    if kind == "cols":
        rows = owner.col_rows
        if rows is None:  # no keystone rows: the columns run over every row
            rows = torch.arange(owner.out_features, device=owner.rows.device)
        cols = owner.cols
    else:
        rows, cols = owner.rows, None
    lo, hi = _row_range(fsdp_param)
    i0, i1 = (int(i) for i in torch.searchsorted(rows.cpu(), torch.tensor([lo, hi])))
    if i1 <= i0:
        return []
    return [_LocalPart(k, i0, i1, fsdp_param, (rows[i0:i1] - lo).to(device), None if cols is None else cols.to(device),
                       kind == "bias")]


class ReplicaSync:
    """What one optimizer bucket of replicated tensors adds to a step on a sharded model.

    ``reduce(grad)``: one all-reduce of the flat gradient arena over the group, divided by its size
    (the mean over ranks, as DDP computes it). ``scatter(master)``: after the fused update, write the
    new values of the rows each rank holds into its shard of the frozen weights (one scatter op per
    keystone tensor with rows on this rank; the fused op itself scatters nothing for them).
    """

    def __init__(self, group, parts: list[_LocalPart], layout, backend: str | None):
        self.group, self.parts, self.layout, self.backend = group, parts, layout, backend

    def reduce(self, grad: Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(grad, group=self.group)
        grad.div_(dist.get_world_size(self.group))

    def scatter(self, master: Tensor) -> None:
        for part in self.parts:
            src = self.layout.view(master, part.k)[part.i0:part.i1]
            ops.scatter_to_frozen(part.local_target(), src, part.rows, part.cols, backend=self.backend)


def bucket_sync(params: list[Tensor], layout, backend: str | None) -> ReplicaSync | None:
    """The :class:`ReplicaSync` of an optimizer bucket, or None when no tensor of it is replicated by fully_shard.

    Raises ValueError when a bucket mixes replicated tensors with others, or tensors of two groups.
    """
    tags = [getattr(p, _GROUP_ATTR, None) for p in params]
    groups = {id(t.group if t is not None else None): (t.group if t is not None else None) for t in tags}
    if list(groups) == [id(None)]:
        return None
    if len(groups) > 1:
        raise ValueError("a KeystoneAdamW param group mixes tensors of a model sharded by keystone_kernels.fully_shard "
                         "with other tensors (or tensors of two sharded models); give each model its own optimizer")
    parts = []
    for k, p in enumerate(params):
        if getattr(p, "_keystone_owner", None) is not None and getattr(p._keystone_owner(), "_keystone_fsdp", None):
            parts += local_parts(k, p, layout.device)
    return ReplicaSync(next(iter(groups.values())), parts, layout, backend)


@torch.no_grad()
def sync_frozen_local(module: KeystoneLinear) -> None:
    """:meth:`KeystoneLinear.sync_frozen` on a sharded module: scatter the rows of this rank's shard."""
    for p in module.keystone_parameters():
        for part in local_parts(0, p, p.device):
            src = p.detach().reshape(-1, 1) if part.bias else p.detach()
            ops.scatter_to_frozen(part.local_target(), src[part.i0:part.i1], part.rows, part.cols,
                                  backend=module.backend)


def _reshard(model: nn.Module) -> None:
    """Free every unsharded weight FSDP2 still holds, so that edits of the shards are what the next forward sees."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
@torch.no_grad()
def scaled_shards(model: nn.Module, mask, factor: float, modules: dict | None = None) -> Iterator[nn.Module]:
    """:func:`~keystone_kernels.scale` on a sharded model: each rank scales the weights the mask owns in its rows.

    Same ownership rule (a row owns its whole row, a column its entries outside the mask's rows) and
    the same bit-exact restore on exit. Only the frozen weights change (as in ``scale`` on a patched
    model): the fp32 masters keep their values, and the next optimizer step or ``sync_frozen`` writes
    them back. Every weight the mask touches must be a projection patched by ``patch``.
    """
    indices = mask.weight_indices(model, modules)  # raises before any edit
    _reshard(model)
    saved = []
    try:
        for key, ind in indices.items():
            module = model.get_submodule(key)
            if not getattr(module, "_keystone_fsdp", None):
                raise ValueError(f"{key} is not a projection patched by keystone_kernels.patch; on a sharded model "
                                 "scale / ablate edit patched projections only")
            fsdp_param = module._keystone_fsdp["frozen_weight"]
            lo, hi = _row_range(fsdp_param)
            local = fsdp_param.sharded_param.to_local()
            rows = ind.rows[(ind.rows >= lo) & (ind.rows < hi)] - lo
            outside = torch.ones(hi - lo, dtype=torch.bool)
            outside[rows] = False
            outside = outside.nonzero().flatten().to(local.device)
            rows, cols = rows.to(local.device), ind.cols.to(local.device)
            saved.append((local, rows, local[rows].clone(), outside, cols, local[outside][:, cols].clone()))
        for local, rows, row_vals, outside, cols, col_vals in saved:
            local[rows] = row_vals * factor if factor != 0 else torch.zeros_like(row_vals)
            block = local[outside]
            block[:, cols] = col_vals * factor if factor != 0 else torch.zeros_like(col_vals)
            local[outside] = block
        yield model
    finally:
        for local, rows, row_vals, outside, cols, col_vals in reversed(saved):
            block = local[outside]
            block[:, cols] = col_vals
            local[outside] = block
            local[rows] = row_vals
        _reshard(model)


# ---------------------------------------------------------------------------------------- gather on save


def _full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call this in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None,
                             masters: bool = False) -> dict[str, Tensor]:
    """The state dict :func:`~keystone_kernels.merge` would give, gathered one tensor at a time onto rank 0's CPU.

    Works on a sharded model (each DTensor is gathered in turn; every rank must call this) and on a
    plain patched one. Projection weights come back under their original names (``q_proj.weight``,
    GPT-2 ``Conv1D`` transposed back) in ``dtype`` (default: the model's dtype before patching): the
    frozen matrix as the patched model computed with it, or with ``masters=True`` the fp32 keystone
    values written in (``merge``'s two options). Other tensors keep their dtype. Only rank 0 keeps
    the tensors (other ranks get an empty dict), so the CPU memory is one model's, on one rank.
    """
    from . import distributed
    from .patching import _patch_state, keystone_modules

    state = _patch_state(model)
    dtype = dtype or state.original_dtype
    keep = distributed.is_main_process()
    modules = keystone_modules(model)
    out: dict[str, Tensor] = {}
    skip = {f"{path}.{name}" for path in modules for name in ("frozen_weight", "frozen_bias", "weight_rows",
                                                               "weight_cols", "bias_rows", "rows", "cols", "col_rows")}
    for path, module in modules.items():
        weight = _full(module.frozen_weight).to(dtype, copy=True)
        bias = None if module.frozen_bias is None else _full(module.frozen_bias).to(dtype, copy=True)
        if not keep:
            continue
        weight = weight.cpu()
        if masters and module.weight_rows is not None:
            weight.index_copy_(0, module.rows.cpu(), module.weight_rows.detach().cpu().to(dtype))
        if masters and module.weight_cols is not None:
            block = weight.index_select(1, module.cols.cpu())
            target = slice(None) if module.col_rows is None else module.col_rows.cpu()
            block[target] = module.weight_cols.detach().cpu().to(dtype)
            weight.index_copy_(1, module.cols.cpu(), block)
        out[f"{path}.weight"] = weight.t().contiguous() if module.transposed else weight
        if bias is not None:
            bias = bias.cpu()
            if masters and module.bias_rows is not None:
                bias.index_copy_(0, module.rows.cpu(), module.bias_rows.detach().cpu().to(dtype))
            out[f"{path}.bias"] = bias
    persistent = model.state_dict(keep_vars=True)
    for name, t in persistent.items():
        if name in skip or name in out:
            continue
        full = _full(t.detach())
        if keep:
            out[name] = full.cpu().clone()
    return out if keep else {}


def save_merged(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                masters: bool = False) -> None:
    """Write the merged plain model (``from_pretrained`` loads it) from a sharded or plain patched model.

    Every rank must call it (the frozen weights are gathered one tensor at a time); rank 0 writes
    ``path`` with ``save_pretrained`` (atomic folder replace), with the keystone adapter beside it as
    ``model.save_pretrained`` of a patched model does, and the others write nothing. The model
    itself stays patched and sharded, so training can go on. ``dtype`` and ``masters`` as for ``merge``.
    """
    from . import distributed
    from ._io import atomic_dir
    from .adapter import ADAPTER_NAME, save_adapter

    state_dict = gather_merged_state_dict(model, dtype, masters)
    if not distributed.is_main_process():
        return
    with atomic_dir(path) as tmp:
        # the class's save_pretrained: the instance's (export.SavePretrainedMerged) cannot gather shards
        type(model).save_pretrained(model, tmp, state_dict=state_dict)
        save_adapter(model, os.path.join(tmp, ADAPTER_NAME))

"""Data-parallel keystone training: what DDP must leave alone, the replica check, process-group helpers.

With DDP each rank holds the whole patched model. Only the keystone gradients need to cross the
network (4 bytes per keystone value per step); the frozen weights never change except through
the optimizer's scatter, which every rank performs identically. So:

- :func:`patch` lists every buffer of every :class:`KeystoneLinear` (frozen weight and bias, row /
  column index buffers) and every non-persistent buffer (rotary ``inv_freq``, recomputed from the
  config on each rank) in ``model._ddp_params_and_buffers_to_ignore``. ``DDP(model)`` (also as
  wrapped by accelerate and the HF Trainer) then neither broadcasts them at start-up nor before
  every forward. Frozen *parameters* (embeddings, norms, lm_head) are still broadcast once at
  start-up, as DDP does for any parameter; none is broadcast per forward.
- Because the start-up broadcast of the frozen weights is skipped, a rank that loaded different
  weights would silently train a different model. :func:`check_replicas` all-gathers an exact
  checksum of every tensor and raises on any difference; ``keystone-kernels sft`` and
  :class:`~keystone_kernels.trainer.KeystoneTrainer` call it before training.

Process-group helpers (rank, barrier, ``torchrun``'s group) are in :mod:`keystone_kernels.utils.dist`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..nn.linear import KeystoneLinear
from ..utils.dist import is_distributed
from ..utils.dtensor import replicated_local

__all__ = [
    "ReplicaMismatchError",
    "ddp_ignored_names",
    "mark_for_ddp",
    "unmark_for_ddp",
    "check_replicas",
    "tensor_checksums",
    "reduction_checksum",
    "data_parallel",
]

_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"
_OURS_ATTR = "_keystone_ddp_ignored"


class ReplicaMismatchError(RuntimeError):
    """Ranks hold different values for tensors that every rank must hold identically."""


# ---------------------------------------------------------------------------------------- DDP


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of the buffers DDP must neither broadcast nor sync.

    Every buffer of a :class:`~keystone_kernels.linear.KeystoneLinear` (``frozen_weight``,
    ``frozen_bias``, ``rows``, ``cols``, ``col_rows``) and every non-persistent buffer of the model
    (derived from the config on each rank, never loaded, e.g. rotary ``inv_freq``).
    """
    names = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        keystone = isinstance(module, KeystoneLinear)
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf is not None and (keystone or buf_name in module._non_persistent_buffers_set):
                names.append(prefix + buf_name)
    return names


def mark_for_ddp(model: nn.Module) -> None:
    """Add :func:`ddp_ignored_names` to ``model._ddp_params_and_buffers_to_ignore`` (kept if already set)."""
    ours = ddp_ignored_names(model)
    theirs = [n for n in getattr(model, _IGNORE_ATTR, []) if n not in set(getattr(model, _OURS_ATTR, []))]
    setattr(model, _IGNORE_ATTR, theirs + [n for n in ours if n not in set(theirs)])
    setattr(model, _OURS_ATTR, ours)


def unmark_for_ddp(model: nn.Module) -> None:
    """Undo :func:`mark_for_ddp` (merge): leave only names someone else put there."""
    ours = set(getattr(model, _OURS_ATTR, []))
    if hasattr(model, _OURS_ATTR):
        delattr(model, _OURS_ATTR)
    rest = [n for n in getattr(model, _IGNORE_ATTR, []) if n not in ours]
    if rest:
        setattr(model, _IGNORE_ATTR, rest)
    elif hasattr(model, _IGNORE_ATTR):
        delattr(model, _IGNORE_ATTR)


# ---------------------------------------------------------------------------------------- replica check

_CHUNK = 251 * (1 << 14)  # 16-bit words per reduction, a multiple of 251 so every chunk has the same weights
_MOD = (1 << 61) - 1  # a Mersenne prime: the per-tensor sums are reduced modulo it


def _words(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a flat int32 tensor of values in [0, 2**16) (1-byte dtypes: [0, 2**8))."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.element_size() == 1:
        return flat.view(torch.uint8).to(torch.int32)
    return flat.view(torch.int16).to(torch.int32) & 0xFFFF


def reduction_checksum(t: torch.Tensor, weights: dict | None = None) -> str:
    """An exact checksum of ``t``'s bits computed on its own device (for GPU tensors: no host copy).

    The bits are read as 16-bit words (so ``-0.0`` vs ``0.0`` and NaN payloads count); word w at
    position i adds w and w * (i % 251 + 1), with int32 products and int64 sums over chunks of about
    4M words, so nothing rounds or overflows; the two sums are taken modulo 2**61 - 1. A changed
    element changes the first sum, swapped elements the second. One host read per tensor.
    """
    weights = {} if weights is None else weights
    if t.device not in weights:
        weights[t.device] = torch.arange(_CHUNK, device=t.device, dtype=torch.int32) % 251 + 1
    w = weights[t.device]
    words = _words(t)
    parts = [torch.zeros(2, dtype=torch.int64, device=t.device)]
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start:start + _CHUNK]
        parts.append(torch.stack([chunk.sum(dtype=torch.int64), (chunk * w[: chunk.numel()]).sum(dtype=torch.int64)]))
    s1, s2 = (torch.stack(parts).sum(0) % _MOD).tolist()  # each part < 2**46, fewer than 2**17 parts
    return f"sum:{t.numel()}:{s1}:{s2}"


def tensor_checksums(tensors: list[torch.Tensor]) -> list[str]:
    """One exact fingerprint per tensor, comparable across ranks whose tensors are on the same device type.

    CPU tensors: BLAKE2b of the raw bytes, dtype and shape (hashlib, one core).
    Other devices: :func:`reduction_checksum`, computed where the tensor lives (memory-bound).
    """
    out, weights = [], {}
    for t in tensors:
        if t.is_meta:
            raise ValueError("tensor_checksums: a tensor is on the meta device; load the weights first")
        if t.device.type == "cpu":
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            h = hashlib.blake2b(memoryview(data), digest_size=16)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            out.append("b2:" + h.hexdigest())
        else:
            out.append(reduction_checksum(t, weights))
    return out


def _replica_state(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    names, tensors = [], []
    for items in (model.named_parameters(), model.named_buffers()):
        for name, t in items:
            local = replicated_local(t)
            if local is not None:
                names.append(name)
                tensors.append(local)
    return names, tensors


def check_replicas(model: nn.Module, group=None, max_listed: int = 5) -> str:
    """Raise :class:`ReplicaMismatchError` on every rank unless all ranks hold the same model values.

    Compares an exact fingerprint (:func:`tensor_checksums`) of every parameter and buffer (the
    frozen weights, keystone tensors and index buffers of a patched model included; FSDP-sharded
    tensors are skipped, each rank holding its own part), plus the patched mask and base
    fingerprint, through one ``all_gather_object`` of a few bytes per tensor. Costs one read of the
    model's weights (README, "Multi-GPU", gives the time measured on the default model). Returns the
    digest all ranks share (also without a process group, where it checks nothing).

    Call it after loading and patching, before training: DDP does not broadcast the frozen weights
    of a patched model (see the module docstring), so nothing else would notice.
    """
    names, tensors = _replica_state(model)
    sums = tensor_checksums(tensors)
    state = getattr(model, "_keystone", None)
    extra = "" if state is None else f"{state.base_fingerprint}|{sorted(state.mask.to_dict().items())!r}"
    digest = hashlib.sha256(repr((names, sums, extra)).encode()).hexdigest()[:16]
    if not is_distributed(group):
        return digest
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (digest, names, sums, extra), group=group)
    if all(g[0] == digest for g in gathered):
        return digest
    lines = []
    for r, (other_digest, other_names, other_sums, other_extra) in enumerate(gathered):
        if other_digest == gathered[0][0]:
            continue
        if other_names != gathered[0][1]:
            diff = sorted(set(other_names) ^ set(gathered[0][1]))[:max_listed]
            lines.append(f"rank {r} has a different set of tensors than rank 0 (e.g. {diff})")
            continue
        bad = [n for n, a, b in zip(other_names, other_sums, gathered[0][2]) if a != b]
        if other_extra != gathered[0][3]:
            bad.insert(0, "(the keystone mask or base fingerprint)")
        more = f" and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        lines.append(f"rank {r} differs from rank 0 in {len(bad)} tensors: {', '.join(bad[:max_listed])}{more}")
    raise ReplicaMismatchError(
        "ranks hold different model values, so they would train different models: " + "; ".join(lines)
        + ". Load the same base weights, mask and adapter on every rank (DDP does not broadcast a patched "
        "model's frozen weights), and do not modify one rank's model after patching.")


def data_parallel(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``model`` wrapped in DDP after :func:`check_replicas` when distributed, else ``model`` itself.

    For a patched model DDP then all-reduces only the keystone gradients (see the module docstring).
    """
    if not is_distributed():
        return model
    check_replicas(model)
    device = device or next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

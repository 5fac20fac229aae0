"""DTensor checks and row-shard arithmetic, without importing ``torch.distributed.tensor`` up front.

Importing that module costs seconds at every process start (docs/design.md section 2 lists the
measured import costs), and no DTensor can exist until someone has imported it, so these helpers look it up in
``sys.modules`` and import its names only once a DTensor is in hand.
"""

from __future__ import annotations

import sys

from torch import Tensor

__all__ = ["is_dtensor", "replicated_local", "full_tensor", "row_shard", "copy_into"]


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    return module is not None and isinstance(t, module.DTensor)


def replicated_local(t: Tensor) -> Tensor | None:
    """The values every rank must share: a plain tensor as it is, a replicated DTensor's local copy, and
    None for a sharded DTensor (each rank holds a different part by design)."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    return t.to_local() if all(isinstance(p, Replicate) for p in t.placements) else None


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: an all-gather for a DTensor (every rank must call this, in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def row_shard(t: Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the global rows a DTensor sharded by rows (``Shard(0)``, FSDP2's ``torch.chunk`` split)
    holds on this rank; ``(0, rows)`` for a plain tensor. ValueError for any other placement."""
    if not is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"a tensor sharded {t.placements}: only row sharding (Shard(0)) is supported")
    out = t.shape[0]
    world = t.device_mesh.size()
    chunk = -(-out // world)
    lo = min(out, t.device_mesh.get_local_rank() * chunk)
    hi = lo + t.to_local().shape[0]
    if hi > out or hi - lo > chunk:
        raise RuntimeError(f"unexpected row shard: rows [{lo}, {hi}) of {out} on {world} ranks")
    return lo, hi


def copy_into(target: Tensor, value: Tensor, name: str) -> None:
    """``target.copy_(value)`` with ``value`` whole; for a DTensor, into this rank's part (replicated: all of
    it; sharded by rows: its rows). ValueError naming ``name`` for a shape or placement that does not fit."""
    if is_dtensor(target):
        from torch.distributed.tensor import Replicate

        local = target.to_local()
        if tuple(target.placements) == (Replicate(),):
            local.copy_(value)
            return
        try:
            lo, hi = row_shard(target)
        except ValueError:
            raise ValueError(f"{name}: cannot load into a DTensor placed {target.placements} (rows only)") from None
        local.copy_(value[lo:hi])
        return
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"{name}: checkpoint has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
    target.copy_(value)

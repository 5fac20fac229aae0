"""Process-group helpers: rank, world size, barrier, broadcast, joining torchrun's group.

Each is safe without a process group (rank 0 of a world of 1). ``GroupTag`` marks a replicated
trainable tensor with the group its gradient is averaged over (set by
:func:`~keystone_kernels.parallel.fsdp.fully_shard`, read by the optimizer).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "barrier", "broadcast_object",
           "init_from_env", "GroupTag", "REPLICA_GROUP_ATTR", "replica_group"]

REPLICA_GROUP_ATTR = "_keystone_replicated_group"  # on replicated trainable tensors: the group their grads reduce over


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


def replica_group(t: torch.Tensor) -> GroupTag | None:
    """The :class:`GroupTag` of a replicated tensor, or None."""
    return getattr(t, REPLICA_GROUP_ATTR, None)


def is_distributed(group=None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 of the default group, or no process group at all: the process that writes files."""
    return rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable); ``obj`` itself when not distributed."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_from_env(timeout_s: float | None = None, device: str | torch.device | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; return this rank's device.

    Without ``WORLD_SIZE`` > 1 in the environment, nothing is initialised and ``device`` (default:
    cuda when present, else cpu) is returned. Otherwise the backend is NCCL for CUDA and gloo for
    the CPU, ``timeout_s`` bounds every collective (a hung rank makes the others fail after it
    instead of waiting 30 minutes, torch's default), and each rank takes ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device

"""Peak memory of a piece of work on any device, from torch's own allocation records.

On CUDA, ``torch.cuda.max_memory_allocated`` says it directly. On the CPU torch keeps no such
counter, so :func:`peak_memory` runs the work under ``torch.profiler`` with ``profile_memory=True``
and replays the allocation / free records in time order. The result counts what the work allocates
on top of what already existed; add :func:`tensor_bytes` of the model for the total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters, their gradients and buffers of ``model``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return tensor_bytes([*model.parameters(), *model.buffers(), *grads])


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by ``fn()`` above what was live when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak

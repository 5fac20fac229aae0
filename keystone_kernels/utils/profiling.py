"""Peak memory and op counts of a piece of work on any device, from torch's own records.

On CUDA, ``torch.cuda.max_memory_allocated`` says it directly. On the CPU torch keeps no such
counter, so :func:`peak_memory` runs the work under ``torch.profiler`` with ``profile_memory=True``
and replays the allocation / free records in time order. The result counts what the work allocates
on top of what already existed; add :func:`tensor_bytes` of the model for the total.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only describe a tensor (metadata, views, no kernel on any device).
_NO_KERNEL = frozenset({
    "aten.view", "aten._unsafe_view", "aten.as_strided", "aten.t", "aten.transpose", "aten.permute",
    "aten.expand", "aten.reshape", "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select",
    "aten.alias", "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.narrow",
    "aten.lift_fresh", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty",
    "aten.new_empty_strided", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.is_same_size",
    "aten.set_", "aten.resize_",
})


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name not in _NO_KERNEL and not name.startswith("profiler."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_device_ops(fn: Callable[[], object]) -> Counter:
    """The ops ``fn()`` dispatches that would each be a device kernel (views and allocations left out).

    Counted below autograd with a ``TorchDispatchMode``, so a backward's ops are counted too and a
    custom op counts once (its own name), whatever kernel runs inside it. On a GPU each counted op is
    about one launch: the host cost of an eager step scales with this number.
    """
    counter = _OpCounter()
    with counter:
        fn()
    return counter.ops


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

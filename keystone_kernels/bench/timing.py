"""Timing, machine info, bandwidth, launch counts and peak memory: how every benchmark measures."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..utils.profiling import peak_memory

GIB = 1024**3


@dataclass
class Timing:
    """Seconds per call: median and quartiles over ``reps`` timed calls after ``warmup`` calls."""

    median: float
    q1: float
    q3: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 1, reps: int = 5,
            min_time_s: float = 0.0, max_reps: int = 200) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``reps`` timed calls and at least
    ``min_time_s`` seconds of them (at most ``max_reps``). CUDA: one pair of events per call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise
    times: list[float] = []
    try:
        spent = 0.0
        while len(times) < reps or (spent < min_time_s and len(times) < max_reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            times.append(t)
            spent += t
    finally:
        if was_enabled:
            gc.enable()
    qs = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), qs[0], qs[2], len(times))


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _git_state() -> tuple[str | None, list[str]]:
    """(HEAD commit, "+dirty" appended when tracked files differ; the differing paths)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, []
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        dirty = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        return head.stdout.strip() + ("+dirty" if dirty else ""), dirty
    except (OSError, subprocess.SubprocessError):
        return None, []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_field_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a Linux /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes;
    None where the file or the field is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_total() -> int | None:
    return proc_field_bytes("/proc/meminfo", "MemTotal")


def machine_info(device: torch.device) -> dict:
    """CPU / GPU model, versions (Python, torch, Triton, Transformers, CUDA), commit, time."""
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(),
    }
    info["commit"], info["modified_files"] = _git_state()
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    return info


def copy_bandwidth(device: str | torch.device, nbytes: int | None = None) -> dict[str, float]:
    """Measured memory bandwidth of the device, bytes/s, from two large streaming fp32 ops.

    ``copy``: ``dst.copy_(src)``, counted as read + write. ``inplace``: ``x.mul_(1)``, read + write
    of the same memory. On a CPU a copy also reads the destination lines before writing them
    (write-allocate), so it shows about 2/3 of what in-place streams reach; an optimizer step
    updates in place. ``limit`` (the larger) is the physical limit quoted beside the results.
    """
    device = torch.device(device)
    nbytes = nbytes or (GIB if device.type == "cuda" else 256 * 1024**2)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / measure(lambda: dst.copy_(src), device, warmup=2, reps=7).median
    inplace = 2 * nbytes / measure(lambda: src.mul_(1.0), device, warmup=2, reps=7).median
    return {"copy": copy, "inplace": inplace, "limit": max(copy, inplace)}


def matmul_rate(device: str | torch.device, n: int | None = None) -> float:
    """Measured FLOP/s of one square matrix product in the dtype a train step computes in on ``device``
    (bf16 on CUDA, fp32 on the CPU): the GEMM rate the train-step bound divides FLOPs by."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / measure(lambda: a @ b, device, warmup=2, reps=5).median


def count_launches(fn: Callable[[], object]) -> int | None:
    """Kernels (and memcpy / memset) that one call of ``fn`` runs on the CUDA device (None if unknown)."""
    try:
        torch.cuda.synchronize()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.profiler.kineto_results.events()
        return sum(1 for e in events if e.device_type() == torch.autograd.DeviceType.CUDA and e.name() != "[memory]")
    except Exception:  # noqa: BLE001 - a profiler problem must not stop the benchmark
        return None


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start / stop lines) for the duration."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live (profiling.peak_memory)."""
    if device.type == "cuda":
        return int(peak_memory(fn, device))
    with quiet_stderr():
        return int(peak_memory(fn, device))


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = proc_field_bytes("/proc/meminfo", "MemAvailable")
    return 8 * GIB if available is None else available

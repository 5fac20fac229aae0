"""Shared test fixtures and helpers. Add fixtures; keep this file generic."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors only under its interpreter, which must be chosen before triton
# is imported. Only without a GPU: on a GPU machine the Triton tests must run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (backend, device) pairs checked against the reference backend. A backend that cannot run on the
# CPU fails its tests (the C++ extension must build everywhere) except Triton without triton
# installed; CUDA pairs are marked gpu and skipped without a GPU.
KERNEL_BACKENDS = [
    pytest.param(("ext", "cpu"), id="ext-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),
    pytest.param(("ext", "cuda"), id="ext-cuda", marks=[gpu, requires_cuda]),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[gpu, requires_cuda]),
]


# The torch.ops namespace of each kernel backend's registered ops (for opcheck).
OPS = {"ext": torch.ops.keystone, "triton": torch.ops.keystone_triton}


def require_backend(name: str, device: str) -> None:
    """Skip when Triton is not installed or cannot run here; any other unavailability is a failure."""
    if name == "triton":
        pytest.importorskip("triton")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only on machines without a GPU)")
    from keystone_kernels.ops import resolve_backend

    assert resolve_backend(name, device) == name


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> tuple[str, str]:
    """(backend, device) of a kernel implementation under test; the reference is the oracle."""
    name, device = request.param
    require_backend(name, device)
    return name, device


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded generator: fresh random inputs per test, reproducible from run to run."""
    return torch.Generator().manual_seed(0x5EED)


POISON_INT = {torch.int64: -(2**62), torch.int32: -(2**30), torch.int16: -(2**14)}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating) or an unlikely sentinel (integer) and return it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(POISON_INT.get(t.dtype, -1))


@contextlib.contextmanager
def poisoned_allocations():
    """Inside, torch.empty & co. (Python, Triton launchers and C++ at::empty) return NaN-filled
    memory, so an op that forgets to write part of its output fails the comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, for bit-identity checks (NaN == NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# Index tensors of the keystone layout: sorted unique int64, or None for "all, in order".
INDEX_KINDS = ("none", "random", "one", "first_last", "empty", "explicit_all")


# (rows kind, cols kind) pairs every op test covers: None, random, empty, one, first+last, all.
INDEX_CASES = [
    ("none", "none"),
    ("random", "none"),
    ("none", "random"),
    ("random", "random"),
    ("empty", "none"),
    ("none", "empty"),
    ("one", "one"),
    ("explicit_all", "random"),
    ("first_last", "explicit_all"),
]


def make_index(kind: str, bound: int, gen: torch.Generator) -> torch.Tensor | None:
    """A sorted unique int64 index into range(bound) of the given kind ("none" gives None)."""
    if kind == "none":
        return None
    if kind == "empty":
        return torch.empty(0, dtype=torch.int64)
    if kind == "one":
        return torch.randint(bound, (1,), generator=gen)
    if kind == "first_last":
        return torch.tensor(sorted({0, bound - 1}), dtype=torch.int64)
    if kind == "explicit_all":
        return torch.arange(bound)
    if kind == "random":
        k = max(2, bound // 3)
        return torch.randperm(bound, generator=gen)[:k].sort().values
    raise ValueError(f"unknown index kind {kind!r}; known: {INDEX_KINDS}")


def complement(idx: torch.Tensor, bound: int) -> torch.Tensor | None:
    """Sorted indices of range(bound) not in idx; None (all, in order) when idx is empty."""
    if idx.numel() == 0:
        return None
    keep = torch.ones(bound, dtype=torch.bool)
    keep[idx] = False
    return keep.nonzero().flatten()


@pytest.fixture(params=[pytest.param(("reference", "cpu"), id="reference-cpu")] + KERNEL_BACKENDS)
def any_backend(request) -> tuple[str, str]:
    """(backend, device) for model-level tests: the reference on the CPU too, then every kernel backend."""
    name, device = request.param
    if name != "reference":
        require_backend(name, device)
    return name, device


def record_launch_devices(monkeypatch, module) -> list:
    """Replace ``module.on_device`` (the Triton launchers' device context) with one that records the
    device of each launch; returns that list."""
    seen = []

    @contextlib.contextmanager
    def recording(t):
        seen.append(t.device)
        yield

    monkeypatch.setattr(module, "on_device", recording)
    return seen


def load_bench_script(name: str):
    """Import ``bench/<name>.py`` (a script of the GPU check, not part of the package) as a module."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FS_OPERATIONS = ("replace", "rename", "fsync", "mkdir", "unlink", "rmdir", "open", "chmod")


def run_killed(kill_at: int, work) -> int:
    """Fork a child that calls ``work(boundary)`` and dies (``os._exit(9)``, like SIGKILL: no clean-up) just
    before its ``kill_at``-th file-system operation; returns its exit code (0: it finished first).

    The ``os`` functions of :data:`FS_OPERATIONS` and ``shutil.rmtree`` count as operations; ``work`` wraps
    more with ``boundary(fn)`` (a save function, an exchange).
    """
    import shutil

    pid = os.fork()
    if pid == 0:
        count = [0]
        try:
            def boundary(fn):
                def wrapped(*a, **k):
                    count[0] += 1
                    if count[0] == kill_at:
                        os._exit(9)
                    return fn(*a, **k)
                return wrapped

            for name in FS_OPERATIONS:
                setattr(os, name, boundary(getattr(os, name)))
            shutil.rmtree = boundary(shutil.rmtree)
            work(boundary)
        finally:
            os._exit(0 if count[0] < kill_at else 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

"""Helpers and fixtures of the pytest-benchmark suites (run with ``pytest bench/ --benchmark-only``).

These suites are not part of the test run (``testpaths = ["tests"]``): they time things and assert
nothing about seconds. Each benchmark runs on the CPU and on CUDA (marked ``gpu``, skipped without
a GPU). The numbers in bench/README.md come from the CLI (``keystone-kernels bench``), which runs
the same cases side by side with memory and ratios.

A plain module rather than a ``conftest.py``: tests/ imports names from its own conftest, and a
second conftest module would shadow it when both folders run in one session. Suites import the
``device`` fixture from here.
"""

from __future__ import annotations

import pytest
import torch

from keystone_kernels.bench import bench_backends

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
BACKENDS = ("reference", "ext", "triton")
FRACTION_IDS = {1e-4: "0.01%", 1e-3: "0.1%", 1e-2: "1%", 5e-2: "5%"}


def require_backend(backend: str, device: torch.device) -> None:
    """Skip a backend that cannot be timed on ``device`` (Triton on CPU is only an interpreter)."""
    if backend not in bench_backends(device):
        pytest.skip(f"backend {backend!r} is not timed on {device.type}")


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so that pytest-benchmark's wall clock is the work."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)

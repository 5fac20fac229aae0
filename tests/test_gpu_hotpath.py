"""bench/gpu_hotpath.py, the hot-path probe of KeystoneAdamW.step() that the GPU check runs, also runs
on a CPU (host time only): a smoke test on a tiny shape, so that the one-off GPU run does not trip
on something a CPU could have caught."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_bench_script

import keystone_kernels


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("gpu_hotpath")


def run_probe(probe, tmp_path) -> tuple[int, dict]:
    out = tmp_path / "hotpath.json"
    # the reference backend: no extension build inside a quick test
    rc = probe.main(["--device", "cpu", "--shape", "tiny", "--layers", "2", "--fraction", "0.05", "--steps", "3",
                     "--backend", "reference", "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_probe_runs_on_cpu_and_writes_both_configurations(probe, tmp_path, capsys):
    rc, report = run_probe(probe, tmp_path)
    assert rc == 0
    info = report["info"]
    assert info["device"] == "cpu" and info["backend"] == "reference" and info["keystone_tensors"] >= 1
    assert list(report["results"]) == ["default", "capturable"]
    default = report["results"]["default"]
    assert default["status"] == "ok" and default["host_ms"] > 0
    assert "gpu_span_ms" not in default and "launch_calls" not in default  # GPU measures only on CUDA
    capturable = report["results"]["capturable"]
    assert capturable["status"] in ("ok", "unsupported")
    assert capturable["host_ms"] > 0 if capturable["status"] == "ok" else capturable["note"]
    printed = capsys.readouterr().out
    assert "host ms" in printed and "capturable" in printed


def test_a_refused_capturable_is_reported_as_unsupported(probe, tmp_path, monkeypatch):
    class WithoutCapturable(keystone_kernels.KeystoneAdamW):
        """A KeystoneAdamW from before the capturable argument."""

        def __init__(self, params, **kwargs):
            if "capturable" in kwargs:
                raise TypeError("KeystoneAdamW.__init__() got an unexpected keyword argument 'capturable'")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(keystone_kernels, "KeystoneAdamW", WithoutCapturable)
    rc, report = run_probe(probe, tmp_path)
    assert rc == 0  # unsupported is a finding, not a failure
    default, capturable = report["results"]["default"], report["results"]["capturable"]
    assert default["status"] == "ok" and default["host_ms"] > 0 and "ran without it" in default["note"]
    assert capturable["status"] == "unsupported" and "capturable" in capturable["note"]
    assert "host_ms" not in capturable


def test_profile_counts_only_inside_the_steps(probe):
    # On a CPU there are no launches or device work; this runs the profiler parsing the GPU run relies on.
    counts = probe.profile_steps(lambda: torch.ones(64).sum(), 3, cuda=False)
    assert counts["steps_profiled"] == 3
    assert counts["launch_calls"] == counts["syncs_profiler"] == counts["kernels"] == counts["gpu_busy_ms"] == 0

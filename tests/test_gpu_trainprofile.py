"""bench/gpu_trainprofile.py, the train-step profile meant for a GPU, also runs on a CPU (host times and
the operator table): a smoke test on two layers of a small shape, so that the one-off GPU run does not
trip on something a CPU could have caught."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench_script


@pytest.fixture(scope="module")
def trainprofile():
    return load_bench_script("gpu_trainprofile")


def test_profile_runs_on_cpu_and_reports_both_sides(trainprofile, tmp_path, capsys):
    out = tmp_path / "prof"
    # the reference backend: no extension build inside a quick test
    rc = trainprofile.main(["--device", "cpu", "--shape", "smollm2-135m", "--layers", "2", "--batch", "1",
                            "--seq", "16", "--fraction", "0.01", "--backend", "reference", "--warmup", "1",
                            "--steps", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "trainprofile.json").read_text())
    assert [r["side"] for r in report["sides"]] == ["dense", "keystone"]
    for side in report["sides"]:
        assert side["status"] == "ok", side
        assert all(side[f"{p}_host_ms"] > 0 for p in trainprofile.PHASES)
        assert "forward_gpu_ms" not in side  # GPU measures only on CUDA
        ops = side["profile"]["top_host_ops"]
        assert ops and all(o["calls"] > 0 and o["self_cpu_ms"] >= 0 for o in ops)
    dense, keystone = report["sides"]
    assert keystone["trainable"] < dense["trainable"] / 10  # the keystone side trains a sliver of the weights
    text = (out / "trainprofile.txt").read_text()
    assert "operators by host (self CPU) time" in text and text.strip() in capsys.readouterr().out


def test_a_keystone_side_may_put_its_layers_on_another_backend(trainprofile, tmp_path):
    out = tmp_path / "prof"
    rc = trainprofile.main(["--device", "cpu", "--shape", "smollm2-135m", "--layers", "1", "--seq", "8",
                            "--fraction", "0.01", "--backend", "reference", "--sides", "keystone@reference",
                            "--warmup", "0", "--steps", "1", "--out", str(out)])
    assert rc == 0
    (side,) = json.loads((out / "trainprofile.json").read_text())["sides"]
    assert side["side"] == "keystone@reference" and side["status"] == "ok"
    assert side["spec"]["side"] == "keystone" and side["spec"]["linear_backend"] == "reference"
    assert side["linear_backend"] == "reference"


def test_a_failing_side_is_reported_and_sets_the_exit_status(trainprofile, tmp_path):
    out = tmp_path / "prof"
    rc = trainprofile.main(["--device", "cpu", "--shape", "smollm2-135m", "--layers", "1", "--seq", "8",
                            "--sides", "nonsense", "--warmup", "0", "--steps", "1", "--out", str(out)])
    assert rc == 1
    (side,) = json.loads((out / "trainprofile.json").read_text())["sides"]
    assert side["status"] == "error" and "nonsense" in side["error"]
    assert "nonsense: error" in (out / "trainprofile.txt").read_text()

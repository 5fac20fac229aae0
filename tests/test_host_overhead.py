"""Smoke test of bench/host_overhead.py: its two measures run, agree with themselves and render."""

from __future__ import annotations

import pytest
from conftest import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("host_overhead")


def test_layer_host_time_times_both_sides_of_each_case(bench):
    rows = bench.layer_host_time(["reference"], calls=3, repeats=1)
    assert [r["case"] for r in rows] == list(bench.LAYER_CASES)
    for r in rows:
        assert r["nn_linear_us"] > 0 and r["keystone_us"] > 0
        assert r["ratio"] == pytest.approx(r["keystone_us"] / r["nn_linear_us"])


def test_train_step_ops_counts_dense_first_and_the_keystone_excess_against_it(bench):
    rows = bench.train_step_ops(["reference"])
    dense, *keystone = rows
    assert dense["side"].startswith("dense") and dense["ops"] == sum(dense["by_op"].values()) > 0
    assert len(keystone) == 2  # fp32 and bf16 frozen weights
    for r in keystone:
        assert r["ops"] == sum(r["by_op"].values())
        assert r["ratio"] == pytest.approx(r["ops"] / dense["ops"])
        for op, extra in r["more_than_dense"].items():
            assert extra == r["by_op"][op] - dense["by_op"].get(op, 0) > 0
    text = bench.render({"layer": bench.layer_host_time(["reference"], 2, 1), "ops": rows})
    assert "ops / step" in text and "keystone reference, frozen bfloat16" in text

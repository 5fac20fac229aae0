"""bench/gpu_check.sh fits one call on a lent GPU machine: its dry run (``GPU_CHECK_DRY=1``, which runs
nothing and needs no GPU) lists every step with its command and time limit, the limits fit 6 minutes,
and the commands it would run parse with the CLIs they call."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from keystone_kernels import bench

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "bench" / "gpu_check.sh"
STEPS = ["info", "build", "tests-triton", "tests-ext", "bench", "train", "pack"]
BUDGET_S = 360  # one call: 6 minutes at most, out of 15 minutes of device time with the machine's start
STEP_LINE = re.compile(r"^step (\d+): (\S+) limit=(\d+)s mode=(sequential|background|concurrent)$")
BUDGET_LINE = re.compile(r"^budget: (\d+) s = limits (\d+) s .* \+ (\d+) x (\d+) s kill grace")


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> dict:
    """The dry run's steps (name -> limit, mode, command) and its budget line."""
    proc = dry_run(tmp_path_factory.mktemp("gpu_check"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    steps, budget = {}, None
    for i, line in enumerate(lines):
        if m := STEP_LINE.match(line):
            assert lines[i + 1].startswith("  $ "), f"no command under {line!r}"
            steps[m[2]] = {"index": int(m[1]), "limit": int(m[3]), "mode": m[4], "cmd": lines[i + 1][4:]}
        elif m := BUDGET_LINE.match(line):
            budget = tuple(int(g) for g in m.groups())
    assert budget is not None, proc.stdout
    return {"steps": steps, "budget": budget, "stdout": proc.stdout}


def test_dry_run_lists_every_step_in_order_with_a_command(dry):
    assert list(dry["steps"]) == STEPS
    assert [s["index"] for s in dry["steps"].values()] == list(range(1, len(STEPS) + 1))
    cmds = {name: s["cmd"] for name, s in dry["steps"].items()}
    assert "ext.load(verbose=True)" in cmds["build"] and "has_cuda()" in cmds["build"]
    assert "-m gpu" in cmds["tests-triton"] and "-k triton" in cmds["tests-triton"] and "-n 8" in cmds["tests-triton"]
    assert "-m gpu" in cmds["tests-ext"] and "-k 'not triton'" in cmds["tests-ext"]
    assert "--train-compiled" in cmds["train"]
    assert "gpu_check_logs.tar.gz" in cmds["pack"]


def test_time_limits_add_up_to_six_minutes_at_most(dry):
    steps = dry["steps"]
    # The Triton tests run while the extension builds in the background, inside the build's limit.
    assert steps["build"]["mode"] == "background" and steps["tests-triton"]["mode"] == "concurrent"
    assert steps["tests-triton"]["limit"] <= steps["build"]["limit"]
    in_line = [s for s in steps.values() if s["mode"] != "concurrent"]
    limits = sum(s["limit"] for s in in_line)
    budget, printed_limits, count, grace = dry["budget"]
    assert printed_limits == limits and count == len(in_line)
    assert budget == limits + count * grace  # SIGKILL comes `grace` s after SIGTERM
    assert budget <= BUDGET_S
    assert all(s["limit"] > 0 for s in steps.values())


def test_dry_run_runs_and_creates_nothing(tmp_path):
    # a python that does not exist: the dry run must not call it
    proc = dry_run(tmp_path, PYTHON=str(tmp_path / "no-such-python"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()
    assert str(tmp_path / "no-such-python") in proc.stdout  # the commands name the chosen python


def _args_of(cmd: str, after: str) -> list[str]:
    """The arguments of ``cmd`` after the token ``after``, without its redirections."""
    tokens = shlex.split(cmd)
    rest = tokens[tokens.index(after) + 1:]
    return [t for t in rest if not t.startswith((">", "2>"))]


def test_bench_step_asks_for_the_focused_set(dry):
    parser = argparse.ArgumentParser()
    bench.add_bench_command(parser.add_subparsers())
    args = parser.parse_args(["bench", *_args_of(dry["steps"]["bench"]["cmd"], "keystone_kernels")[1:]])
    assert args.device == "cuda" and args.quick
    assert args.shapes == "llama-3.1-8b" and set(args.parts.split(",")) == {"host", "optimizer", "wgrad"}
    assert bench.parse_fractions(args.fractions) == [1e-3, 1e-2]
    assert set(args.backends.split(",")) == {"triton", "ext"}


def test_train_step_runs_every_side_at_its_best_at_both_token_counts_inside_its_limit(dry):
    """Issue 20: 1 x 512 and 4 x 2048, dense / keystone / LoRA r=16, eager and compiled, with a deadline that
    leaves the step time to write its tables before its limit kills it."""
    parser = argparse.ArgumentParser()
    bench.add_bench_command(parser.add_subparsers())
    step = dry["steps"]["train"]
    args = parser.parse_args(["bench", *_args_of(step["cmd"], "keystone_kernels")[1:]])
    assert args.device == "cuda" and args.parts == "train" and args.train_compiled and args.lora_ranks == "16"
    plan = bench.make_plan(torch.device("cpu"), True, backends=["reference"])
    assert [t[:3] for t in bench.parse_train_steps(args.train_steps, plan)] == [
        ("llama-3.2-1b", 1, 512), ("llama-3.2-1b", 4, 2048)]
    assert 0 < args.train_deadline <= step["limit"] - 5
    assert args.name == "bench_cuda_train"


def test_parse_train_steps_rejects_what_it_cannot_run():
    plan = bench.make_plan(torch.device("cpu"), True, backends=["reference"], fractions=[1e-2])
    assert bench.parse_train_steps("smollm2-135m:4x128, qwen3-0.6b:1X64", plan) == [
        ("smollm2-135m", 4, 128, [(1e-2, "reference")]), ("qwen3-0.6b", 1, 64, [(1e-2, "reference")])]
    for bad in ("llama:1x512", "llama-3.2-1b", "llama-3.2-1b:0x512", "llama-3.2-1b:1x"):
        with pytest.raises(ValueError, match="SHAPE:BATCHxSEQ"):
            bench.parse_train_steps(bad, plan)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_full.sh"])
def test_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr

"""What one ``bench`` run measures (:class:`Plan`) and the runner that writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import ops
from .baselines import plot_baselines
from .optimizer import bench_host, bench_optimizer
from .report import plot, report, summarize
from .shapes import FRACTIONS, SHAPES, Shape
from .timing import GIB, copy_bandwidth, free_device_bytes, loadavg, machine_info, matmul_rate
from .train import bench_train
from .wgrad import bench_wgrad


@dataclass
class Plan:
    """What one ``bench`` run measures."""

    device: torch.device
    quick: bool
    fractions: tuple[float, ...]
    backends: tuple[str, ...]
    optimizer_shapes: tuple[str, ...]
    wgrad_shapes: tuple[str, ...]
    wgrad_tokens: int
    train: list[tuple[str, int, int, list[tuple[float, str]]]]  # (shape, batch, seq, [(fraction, backend)])
    warmup: int = 1
    reps: int = 3
    train_warmup: int = 2
    train_reps: int = 3
    budget: int = 6 * GIB
    parts: tuple[str, ...] = ("host", "optimizer", "wgrad", "train")
    default_backend: str | None = None  # what backend="auto" picks on the device, quoted by the targets
    notes: list[str] = field(default_factory=list)
    # PEFT LoRA rows (and, with liger, Liger-Kernel rows) beside these (shape, batch, seq) train steps
    lora_ranks: tuple[int, ...] = ()
    baseline_steps: tuple[tuple[str, int, int], ...] = ()
    liger: bool = False
    train_compiled: bool = False  # every side at its best too: torch.compile rows, dense in pure bf16
    train_deadline_s: float | None = None  # seconds the train part may take; rows that do not fit are noted


def bench_backends(device: torch.device) -> list[str]:
    """Backends worth timing on ``device``: Triton on CPU only runs under its interpreter (not a speed)."""
    names = ops.available_backends(device)
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def make_plan(device: torch.device, quick: bool, backends: Sequence[str] | None = None,
              shapes: Sequence[str] | None = None, fractions: Sequence[float] | None = None,
              parts: Sequence[str] | None = None, budget_gb: float | None = None) -> Plan:
    """The default benchmark set of a device, quick or full; arguments narrow it down."""
    cuda = device.type == "cuda"
    fr = tuple(fractions or FRACTIONS)
    bk = tuple(backends or bench_backends(device))
    auto = "triton" if cuda and "triton" in bk else ("ext" if "ext" in bk else bk[0])
    if cuda:  # docs/design.md section 8 measures the GPU on the 8B optimizer step and the 1B train step
        if quick:
            opt_shapes, wg_shapes = ("smollm2-135m", "llama-3.1-8b"), ("llama-3.1-8b",)
            train = [("llama-3.2-1b", 1, 512, [(1e-3, auto)]), ("llama-3.2-1b", 4, 2048, [(1e-3, auto)])]
        else:
            opt_shapes = wg_shapes = tuple(SHAPES)
            train = [("smollm2-135m", 4, 512, [(1e-3, auto)]),
                     ("llama-3.2-1b", 1, 512,
                      [(f, auto) for f in fr] + [(1e-3, b) for b in bk if b not in (auto, "reference")]),
                     ("llama-3.2-1b", 4, 2048, [(1e-3, auto), (1e-2, auto)]),
                     ("qwen3-0.6b", 4, 2048, [(1e-3, auto)])]
    elif quick:
        opt_shapes = wg_shapes = ("smollm2-135m",)
        train = [("smollm2-135m", 4, 128, [(1e-3, auto)])]
    else:  # dense fine-tuning of the larger shapes does not fit a CPU machine's memory: SmolLM2 only
        opt_shapes = wg_shapes = tuple(SHAPES)
        train = [("smollm2-135m", 4, 128, [(f, b) for f in fr for b in bk]),
                 ("smollm2-135m", 1, 128, [(1e-3, auto)])]  # fewer tokens: activations weigh less in the memory ratio
    if shapes:
        unknown = set(shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
        opt_shapes = tuple(s for s in shapes)
        wg_shapes = opt_shapes
        train = ([t for t in train if t[0] in shapes]
                 or [(s, 4, 128 if not cuda else 512, [(1e-3, auto)]) for s in shapes[:1]])
    train = [(s, b, q, [(f, k) for f, k in cases if f in fr and k in bk]) for s, b, q, cases in train]
    train = [t for t in train if t[3]]
    # the baseline users would pick instead: PEFT LoRA on the same seven projections (issue 13's targets)
    wanted = ("llama-3.2-1b", 4, 2048) if cuda else ("smollm2-135m", 4, 128)
    baseline_steps = tuple((s, b, q) for s, b, q, _ in train if (s, b, q) == wanted)
    lora_ranks = (16,) if quick else (8, 16, 64)
    total = free_device_bytes(device)
    budget = int(budget_gb * GIB) if budget_gb else int(min(6 * GIB, 0.4 * total) if not cuda else 0.4 * total)
    known_parts = ("host", "optimizer", "wgrad", "train")
    parts = tuple(parts or known_parts)
    if set(parts) - set(known_parts):
        raise ValueError(f"unknown parts {sorted(set(parts) - set(known_parts))}; known: {', '.join(known_parts)}")
    return Plan(device, quick, fr, bk, opt_shapes, wg_shapes, 512 if not cuda else 8192, train,
                # a dense train step on the CPU settles only after a few steps (the allocator's heap grows
                # to its working set; until then large buffers are mapped and faulted in afresh)
                # on a GPU at least 3 warm-up and 10 timed steps (a step there takes tens of milliseconds)
                warmup=1, reps=3 if quick else 5, train_warmup=3 if cuda or not quick else 2,
                train_reps=10 if cuda else (3 if quick else 5),
                budget=budget, parts=parts, default_backend=auto, lora_ranks=lora_ranks, baseline_steps=baseline_steps)


def train_fits(shape: Shape, batch: int, seq: int, device: torch.device) -> tuple[bool, str]:
    """Dense full fine-tuning needs ~16 B per parameter plus activations; skip what cannot fit."""
    need = 16 * shape.total_params + 4 * batch * seq * (shape.vocab * 3 + shape.layers * 16 * shape.hidden)
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else free_device_bytes(device))
    ok = need < 0.85 * have
    return ok, (f"dense needs ~{need / GIB:.0f} GiB, "
                f"{have / GIB:.0f} GiB {'total' if device.type == 'cuda' else 'available'}")


def run(plan: Plan, out_dir: str | os.PathLike, log: Callable[[str], None] = print,
        file_stem: str | None = None) -> dict:
    """Run ``plan``; write ``<stem>.json`` (after every part), ``.md`` (the tables), ``.png`` (the plot) and,
    with LoRA rows, ``<stem>_train.png`` in ``out_dir``; ``file_stem`` defaults to ``bench_<device>[_quick]``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = plan.device
    stem = file_stem or f"bench_{device.type}{'_quick' if plan.quick else ''}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    bw = copy_bandwidth(device)
    bandwidth = bw["limit"]
    gemm = matmul_rate(device) if "train" in plan.parts else None
    results: dict = {
        "machine": machine_info(device),
        "config": {"device": device.type, "quick": plan.quick, "fractions": list(plan.fractions),
                   "backends": list(plan.backends), "default_backend": plan.default_backend,
                   "warmup": plan.warmup, "reps": plan.reps, "train_warmup": plan.train_warmup,
                   "train_reps": plan.train_reps,
                   "budget_bytes": plan.budget, "lora_ranks": list(plan.lora_ranks),
                   "baseline_steps": [list(t) for t in plan.baseline_steps], "liger": plan.liger,
                   "bandwidth": bw, "matmul_rate": gemm, "train_compiled": plan.train_compiled,
                   "train_deadline_s": plan.train_deadline_s, "loadavg_start": loadavg(), "notes": plan.notes,
                   "command": " ".join(sys.argv)},
        "host": [], "optimizer": [], "wgrad": [], "train": [],
    }
    log(f"bench on {device.type}: backends {', '.join(plan.backends)}; bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(copy {bw['copy'] / 1e9:.1f}, in place {bw['inplace'] / 1e9:.1f}); "
        f"load {results['config']['loadavg_start']}")

    def save():
        results["config"]["loadavg_end"] = loadavg()
        results["summary"] = summarize(results)
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, json_path)

    if "host" in plan.parts:
        host_backends = [b for b in plan.backends if b != "reference"] or list(plan.backends)
        results["host"].append(bench_host(host_backends, device, reps=10 if plan.quick else 30, log=log))
        save()
    if "optimizer" in plan.parts:
        for name in plan.optimizer_shapes:
            results["optimizer"].append(bench_optimizer(SHAPES[name], plan.fractions, plan.backends, device,
                                                        warmup=plan.warmup, reps=plan.reps, budget=plan.budget,
                                                        bandwidth=bandwidth, log=log))
            results["optimizer"][-1]["loadavg"] = loadavg()
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "wgrad" in plan.parts:
        for name in plan.wgrad_shapes:
            results["wgrad"].append(bench_wgrad(SHAPES[name], plan.fractions, plan.backends, device, plan.wgrad_tokens,
                                                warmup=plan.warmup, reps=plan.reps, log=log))
            results["wgrad"][-1]["loadavg"] = loadavg()
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "train" in plan.parts:
        deadline = None if plan.train_deadline_s is None else time.monotonic() + plan.train_deadline_s
        for name, batch, seq, cases in plan.train:
            if deadline is not None and time.monotonic() > deadline - 10:
                log(f"train step {name} {batch}x{seq}: not run (--train-deadline {plan.train_deadline_s:g} s)")
                results["config"]["notes"].append(f"train step {name} {batch}x{seq} not run: the deadline had passed")
                continue
            ok, why = train_fits(SHAPES[name], batch, seq, device)
            if not ok:
                log(f"train step {name} {batch}x{seq}: skipped ({why})")
                results["config"]["notes"].append(f"train step {name} {batch}x{seq} skipped: {why}")
                continue
            try:
                is_baseline = (name, batch, seq) in plan.baseline_steps
                results["train"].append(bench_train(SHAPES[name], device, batch, seq, cases, warmup=plan.train_warmup,
                                                    reps=plan.train_reps, log=log, liger=plan.liger and is_baseline,
                                                    lora_ranks=plan.lora_ranks if is_baseline else (),
                                                    compiled=plan.train_compiled, deadline=deadline))
                results["train"][-1]["loadavg"] = loadavg()
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                log(f"train step {name} {batch}x{seq}: FAILED: {err}")
                results["config"]["notes"].append(f"train step {name} {batch}x{seq} failed: {err}")
            save()
    save()
    results["files"] = {"json": str(json_path)}
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(report(results, markdown=True) + "\n")
    results["files"]["markdown"] = str(md_path)
    if plot(results, png_path):
        results["files"]["plot"] = str(png_path)
    if plot_baselines(results, out_dir / f"{stem}_train.png"):
        results["files"]["train_plot"] = str(out_dir / f"{stem}_train.png")
    return results


def rerender(json_path: str | os.PathLike) -> dict:
    """Recompute the summary of a results JSON and rewrite its ``.md`` and ``.png`` beside it."""
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    results["summary"] = summarize(results)
    json_path.write_text(json.dumps(results, indent=1, default=str))
    results["files"] = {"json": str(json_path)}
    md_path = json_path.with_suffix(".md")
    md_path.write_text(report(results, markdown=True) + "\n")
    results["files"]["markdown"] = str(md_path)
    if plot(results, json_path.with_suffix(".png")):
        results["files"]["plot"] = str(json_path.with_suffix(".png"))
    train_png = json_path.with_name(json_path.stem + "_train.png")
    if plot_baselines(results, train_png):
        results["files"]["train_plot"] = str(train_png)
    return results

"""Where the time of one train step goes: dense AdamW against keystone, phase by phase, kernel by kernel.

The first GPU check (H200, 2026-11-27) measured the Llama-3.2-1B 1 x 512 keystone train step at 0.79x
dense AdamW, where the FLOP count allows 1.48x. This probe says why. It builds each side exactly as
the benchmark does (``keystone_kernels.bench.train.build_train_step``: dense = fp32 weights, bf16
autocast, torch AdamW(fused); keystone = bf16 model, ``patch``, KeystoneAdamW), then per side:

- phases: the median host wall time and GPU span (CUDA events) of the forward, the backward and the
  optimizer (``step`` + ``zero_grad``) over ``--steps`` steps. A GPU span close to the host time
  means the host waits on the GPU (device-bound); a GPU busy time far below the span means the GPU
  idles between kernels (host-bound);
- a profile of two steps: kernel launches and device time per step, the kernels with the most device
  time and the operators with the most host (self CPU) time.

``keystone@reference`` is the keystone side with its patched layers on the reference ops (on CUDA the
weight gradient is one cuBLAS GEMM per block instead of a Triton kernel behind a custom op) and the
optimizer on ``--backend``: whether the weight-gradient path is what slows the step.

On a CPU only the host times and the operator table are measured (a smoke test for CI).

Usage (from the repository root):
    python3 bench/gpu_trainprofile.py [--device cuda] [--shape llama-3.2-1b] [--batch 1] [--seq 512]
                                      [--layers N] [--fraction 0.001] [--backend auto] [--steps 5]
                                      [--sides dense,keystone,keystone@reference] [--out trainprofile]
Writes OUT/trainprofile.json (every number) and OUT/trainprofile.txt (the tables), prints the text.
Exit status 1 when a side failed (its error is in both files), else 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

try:
    import keystone_kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed (the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystone_kernels.bench import SHAPES
from keystone_kernels.bench.timing import quiet_stderr
from keystone_kernels.bench.train import TrainSpec, build_train_step
from keystone_kernels.utils.tables import format_table

PHASES = ("forward", "backward", "optimizer")
TOP = 15  # rows of each profile table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(step, device: torch.device, steps: int) -> dict:
    """Median host ms and (CUDA) GPU-span ms of each phase over ``steps`` steps."""
    cuda = device.type == "cuda"
    host: dict[str, list[float]] = {p: [] for p in PHASES}
    span: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(steps):
        _sync(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)] if cuda else None
        marks = [time.perf_counter()]
        if cuda:
            events[0].record()
        loss = step.forward()
        for i, phase in enumerate(PHASES):
            if phase == "backward":
                loss.backward()
            elif phase == "optimizer":
                step.optimize()
            marks.append(time.perf_counter())  # host time: when the phase's call returned
            if cuda:
                events[i + 1].record()
        _sync(device)
        for i, phase in enumerate(PHASES):
            host[phase].append(1e3 * (marks[i + 1] - marks[i]))
            if cuda:
                span[phase].append(events[i].elapsed_time(events[i + 1]))
    out = {f"{p}_host_ms": statistics.median(host[p]) for p in PHASES}
    if cuda:
        out.update({f"{p}_gpu_ms": statistics.median(span[p]) for p in PHASES})
    out["step_host_ms"] = sum(out[f"{p}_host_ms"] for p in PHASES)
    return out


def _attr(event, *names: str, default=0.0):
    """The first attribute of ``names`` that the profiler's event has (their names moved between torch versions)."""
    for name in names:
        if hasattr(event, name):
            return getattr(event, name)
    return default


def profile_steps(step, device: torch.device, steps: int = 2) -> dict:
    """Launches and device time per step, the top kernels by device time and ops by host self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with quiet_stderr(), profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    averages = prof.key_averages()
    ops = sorted(averages, key=lambda e: _attr(e, "self_cpu_time_total"), reverse=True)
    out: dict = {"steps_profiled": steps, "top_host_ops": [
        {"name": e.key, "calls": e.count / steps, "self_cpu_ms": _attr(e, "self_cpu_time_total") / 1e3 / steps}
        for e in ops[:TOP]]}
    if cuda:
        # device-side rows: time spent on the device by the event itself (kernels, copies, fills)
        device_rows = [e for e in averages if _attr(e, "self_device_time_total", "self_cuda_time_total") > 0]
        kernels = sorted(device_rows, key=lambda e: _attr(e, "self_device_time_total", "self_cuda_time_total"),
                         reverse=True)
        busy_us = sum(_attr(e, "self_device_time_total", "self_cuda_time_total") for e in device_rows)
        launches = sum(e.count for e in averages if e.key.startswith(("cudaLaunch", "cuLaunch")))
        out.update(gpu_busy_ms=busy_us / 1e3 / steps, launch_calls=launches / steps, top_kernels=[
            {"name": e.key, "calls": e.count / steps,
             "device_ms": _attr(e, "self_device_time_total", "self_cuda_time_total") / 1e3 / steps}
            for e in kernels[:TOP]])
    return out


def probe_side(name: str, args) -> dict:
    """Every measure of one side; an error is reported in the result, not raised.

    ``name``: ``dense``, ``keystone``, ``lora``, or ``keystone@BACKEND``: keystone with the patched
    layers (their weight gradients) on BACKEND and the optimizer on ``--backend``.
    """
    side, _, linear_backend = name.partition("@")
    spec = TrainSpec(shape=args.shape, side=side, device=args.device, batch=args.batch, seq=args.seq,
                     fraction=args.fraction, backend=args.backend, seed=0, layers=args.layers,
                     linear_backend=linear_backend or None)
    device = torch.device(args.device)
    result: dict = {"side": name, "spec": asdict(spec)}
    try:
        step, info = build_train_step(spec)
        result.update(optimizer=info.get("optimizer"), trainable=info.get("trainable"), backend=info.get("backend"),
                      linear_backend=spec.linear_backend or info.get("backend"))
        for _ in range(args.warmup):  # allocates optimizer state, compiles Triton kernels
            step()
        result.update(time_phases(step, device, args.steps))
        try:
            result["profile"] = profile_steps(step, device)
        except Exception as err:  # noqa: BLE001 - keep the phase times of a one-off GPU run
            result["profile_error"] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - report it, measure the other side
        result.update(status="error", error=f"{type(err).__name__}: {err}")
    finally:
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return result


def report_text(report: dict) -> str:
    def f(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    i = report["info"]
    lines = [f"train step profile: {i['shape']}{' x ' + str(i['layers']) + ' layers' if i['layers'] else ''}, "
             f"batch {i['batch']} x seq {i['seq']}, {100 * i['fraction']:g}% keystone, {i['device']}"
             f"{' (' + i['gpu'] + ')' if i['gpu'] else ''}, torch {i['torch']}; medians of {i['steps']} steps, ms"]
    head = ["side", "status"] + [f"{p} host" for p in PHASES] + [f"{p} GPU" for p in PHASES]
    head += ["GPU busy", "launches"]
    rows = []
    for r in report["sides"]:
        prof = r.get("profile", {})
        rows.append([r["side"], r["status"]] + [f(r.get(f"{p}_host_ms")) for p in PHASES]
                    + [f(r.get(f"{p}_gpu_ms")) for p in PHASES]
                    + [f(prof.get("gpu_busy_ms")), f(prof.get("launch_calls"))])
    lines.append(format_table(head, rows))
    for r in report["sides"]:
        for key in ("error", "profile_error"):
            if key in r:
                lines.append(f"{r['side']}: {key} {r[key]}")
        prof = r.get("profile")
        if not prof:
            continue
        if prof.get("top_kernels"):
            lines.append(f"\n{r['side']}: kernels by device time per step")
            lines.append(format_table(["ms", "calls", "kernel"], [
                [f(k["device_ms"]), f(k["calls"]), k["name"][:100]] for k in prof["top_kernels"]]))
        lines.append(f"\n{r['side']}: operators by host (self CPU) time per step")
        lines.append(format_table(["ms", "calls", "operator"], [
            [f(o["self_cpu_ms"]), f(o["calls"]), o["name"][:100]] for o in prof["top_host_ops"]]))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES), help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: all of the shape)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--fraction", type=float, default=1e-3, help="keystone fraction of neurons (default 0.001)")
    p.add_argument("--backend", default="auto", help="keystone backend (default auto)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    p.add_argument("--sides", default="dense,keystone",
                   help="comma-separated: dense, keystone, lora, keystone@BACKEND (the patched layers on BACKEND)")
    p.add_argument("--out", default="trainprofile", help="folder for trainprofile.json / .txt (default ./trainprofile)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    info = {"device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "shape": args.shape, "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "fraction": args.fraction, "backend": args.backend, "steps": args.steps}
    report = {"info": info, "sides": [probe_side(side, args) for side in args.sides.split(",")]}
    text = report_text(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainprofile.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "trainprofile.txt").write_text(text + "\n")
    print(f"wrote {out / 'trainprofile.json'}, {out / 'trainprofile.txt'}")
    return 1 if any(r["status"] != "ok" for r in report["sides"]) else 0


if __name__ == "__main__":
    sys.exit(main())

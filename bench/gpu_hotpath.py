"""Hot-path probe of ``KeystoneAdamW.step()``: host syncs, host time against GPU time, kernel launches.

A keystone step moves little data, so on a GPU its cost is mostly host work: Python bookkeeping,
kernel launches and device syncs (a ``float(norm)`` for the finiteness check waits for the GPU).
This probe patches a few decoder layers of a model shape (random weights, nothing downloaded), runs
one forward + backward for gradients, then times ``step()`` of two optimizers over the same
keystone tensors:

- ``default``: ``KeystoneAdamW(params, lr=1e-4, capturable=False)``;
- ``capturable``: ``KeystoneAdamW(params, lr=1e-4, capturable=True, max_grad_norm=1.0,
  nonfinite="skip")``, torch.optim.AdamW's meaning: no host read of a device value in ``step()``.
  Reported as ``unsupported`` when the constructor rejects it.

Per step, on CUDA: host syncs (counted twice: the warnings of ``torch.cuda.set_sync_debug_mode``
and the synchronizing CUDA API calls the profiler sees inside ``step()``), host wall time of the
``step()`` call, GPU time (CUDA events around each step: the span the GPU spends on it, idle gaps
included; and the profiler's sum of kernel durations, busy time only), kernel launch calls
(``cudaLaunchKernel`` / ``cuLaunchKernel``) and the kernels / copies the device ran. On a CPU only
the host time is measured (a smoke test for CI).

Usage (from the repository root):
    python3 bench/gpu_hotpath.py [--device cuda] [--shape llama-3.2-1b] [--layers 4] [--steps 50]
                                 [--fraction 0.001] [--backend auto] [--out gpu_hotpath.json]
Prints a table and writes the JSON. Exit status 1 when a configuration failed (an error, not
"unsupported"), else 0. ``--shape tiny`` is a small Llama-like shape for smoke tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import keystone_kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed (the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystone_kernels.bench import SHAPES, Shape, build_model, quiet_stderr, synthetic_mask

# A small Llama-like shape for the CPU smoke test (seconds, not minutes).
TINY = Shape("tiny", "llama", 64, 128, 2, 4, 2, 256, True)
CONFIGS = {
    "default": dict(capturable=False),
    "capturable": dict(capturable=True, max_grad_norm=1.0, nonfinite="skip"),
}
LR = 1e-4
_STEP_MARK = "keystone_hotpath_step"
# CUDA API calls that block the host until the device has caught up (an .item() is a
# cudaMemcpyAsync followed by cudaStreamSynchronize; a plain cudaMemcpy blocks by itself).
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2")
_LAUNCH_PREFIXES = ("cudaLaunch", "cuLaunch")  # runtime (torch, the extension) and driver (Triton) launches


def _device_kind(name: str) -> str:
    """"memcpy", "memset" or "kernel" for a device event (torch 2.11's kineto events have no public
    activity type; CUPTI names copies "Memcpy HtoD (...)" and fills "Memset (...)")."""
    return "memcpy" if name.startswith("Memcpy") else "memset" if name.startswith("Memset") else "kernel"


def build_patched(shape: Shape, layers: int, fraction: float, device: torch.device, backend: str,
                  batch: int, seq: int, seed: int = 0):
    """A patched model of ``layers`` decoder layers of ``shape`` with keystone gradients from one
    forward + backward; returns ``(model, keystone parameters)``."""
    from keystone_kernels import keystone_parameters, patch

    model = build_model(shape, layers, device=device, dtype=torch.bfloat16, seed=seed)
    mask = synthetic_mask(model, fraction, seed)
    # On a CPU the rest of the model computes in fp32, as the benchmark's train step does.
    patch(model, mask, frozen_dtype=torch.bfloat16, backend=backend,
          other_dtype=torch.float32 if device.type == "cpu" else None)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return model, keystone_parameters(model)


def make_optimizer(params, name: str, backend: str):
    """``(optimizer or None, status, note)``; status "ok", "unsupported" (the constructor refused
    capturable=True) or "error" (the constructor failed otherwise)."""
    from keystone_kernels import KeystoneAdamW

    kwargs = CONFIGS[name]
    try:
        return KeystoneAdamW(params, lr=LR, backend=backend, **kwargs), "ok", ""
    except Exception as err:  # noqa: BLE001 - sorted out below, reported rather than raised
        why = f"{type(err).__name__}: {err}"
        if name == "default" and isinstance(err, TypeError) and "capturable" in str(err):
            # capturable=False is what a KeystoneAdamW without the argument does: still measure it.
            rest = {k: v for k, v in kwargs.items() if k != "capturable"}
            return (KeystoneAdamW(params, lr=LR, backend=backend, **rest), "ok",
                    "KeystoneAdamW has no capturable argument: ran without it")
        if kwargs.get("capturable") and isinstance(err, (TypeError, ValueError, NotImplementedError)):
            return None, "unsupported", why  # unknown argument, or refused on this device / backend
        return None, "error", why


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> dict:
    """Host wall time of each ``step()`` call and, on CUDA, the GPU span of each (events around it)."""
    cuda = device.type == "cuda"
    host, events = [], []
    _sync(device)
    gc.collect()
    gc.disable()  # a collection inside a timed call is noise
    try:
        for _ in range(steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            if cuda:
                end.record()
                events.append((start, end))
        _sync(device)
    finally:
        gc.enable()
    out = {"host_ms": 1e3 * statistics.median(host), "host_ms_mean": 1e3 * statistics.fmean(host)}
    if cuda:
        spans = [s.elapsed_time(e) for s, e in events]
        out.update(gpu_span_ms=statistics.median(spans), gpu_span_ms_mean=statistics.fmean(spans))
    return out


def count_sync_warnings(step, steps: int) -> float:
    """Host syncs per step seen by ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per sync)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not the first per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def profile_steps(step, steps: int, cuda: bool = True) -> dict:
    """Per step, from a profile of ``steps`` calls: launch calls and host syncs made inside ``step()``
    (CPU-side API events within the step's annotation), and the device work (kernels, copies, busy time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with quiet_stderr(), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(_STEP_MARK):
                step()
        if cuda:
            torch.cuda.synchronize()  # outside every step window: not counted
    events = prof.profiler.kineto_results.events()
    cuda_type = torch.autograd.DeviceType.CUDA
    # the CPU-side annotation of each step (with CUDA there is a device-side one of the same name too)
    windows = [(e.start_ns(), e.end_ns()) for e in events if e.name() == _STEP_MARK and e.device_type() != cuda_type]

    def in_step(e) -> bool:
        return any(a <= e.start_ns() <= b for a, b in windows)

    launches = launches_all = syncs = kernels = device_ops = 0
    busy_ns = 0
    for e in events:
        name = e.name()
        if e.device_type() == cuda_type:
            if name != _STEP_MARK:  # the device-side copy of the annotation is no work
                device_ops += 1
                kernels += _device_kind(name) == "kernel"
                busy_ns += e.duration_ns()
        elif name.startswith(_LAUNCH_PREFIXES):
            launches_all += 1  # a cross-check of the step windows: only steps launch work here
            launches += in_step(e)
        elif name in _SYNC_CALLS and in_step(e):
            syncs += 1
    return {"steps_profiled": len(windows), "launch_calls": launches / steps, "launch_calls_all": launches_all / steps,
            "syncs_profiler": syncs / steps,
            "kernels": kernels / steps, "device_ops": device_ops / steps, "gpu_busy_ms": busy_ns / 1e6 / steps}


def probe(opt, device: torch.device, steps: int, warmup: int = 3) -> dict:
    """Every measure of one optimizer; a measure that fails is reported as its error, not raised."""
    step = opt.step
    for _ in range(warmup):  # the first step allocates the state (and compiles Triton kernels)
        step()
    _sync(device)
    out = time_steps(step, device, steps)
    if device.type != "cuda":
        return out
    for key, fn in (("syncs_warn", lambda: count_sync_warnings(step, min(steps, 10))),
                    ("profile", lambda: profile_steps(step, min(steps, 5)))):
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - keep the other measures of a one-off GPU run
            out[f"{key}_error"] = f"{type(err).__name__}: {err}"
            continue
        out.update(value if isinstance(value, dict) else {key: value})
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    model, params = build_patched(shape, args.layers, args.fraction, device, args.backend, args.batch, args.seq)
    info = {
        "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "shape": shape.name, "layers": args.layers, "fraction": args.fraction,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "backend": model._keystone.backend,
        "keystone_tensors": len(params), "keystone_params": sum(p.numel() for p in params), "lr": LR,
    }
    results = {}
    for name in CONFIGS:
        opt, status, note = make_optimizer(params, name, args.backend)
        r = {"status": status, "kwargs": CONFIGS[name]}
        if note:
            r["note"] = note
        if opt is not None:
            try:
                r.update(probe(opt, device, args.steps))
            except Exception as err:  # noqa: BLE001 - report it, measure the other configuration
                r.update(status="error", note=f"{type(err).__name__}: {err}")
        results[name] = r
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"info": info, "results": results}


def table(report: dict) -> str:
    from keystone_kernels.utils.tables import format_table

    def f(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    rows = []
    for name, r in report["results"].items():
        rows.append([name, r["status"], f(r.get("host_ms")), f(r.get("gpu_span_ms")), f(r.get("gpu_busy_ms")),
                     f(r.get("syncs_warn")), f(r.get("syncs_profiler")), f(r.get("launch_calls")), f(r.get("kernels"))])
    i = report["info"]
    head = (f"KeystoneAdamW.step() hot path: {i['shape']} x {i['layers']} layers, {100 * i['fraction']:g}% keystone, "
            f"{i['keystone_tensors']} tensors / {i['keystone_params']} weights, backend {i['backend']}, "
            f"{i['device']}{' (' + i['gpu'] + ')' if i['gpu'] else ''}, {i['steps']} timed steps; medians per step")
    body = format_table(["optimizer", "status", "host ms", "GPU span ms", "GPU busy ms", "syncs (warn)",
                         "syncs (profiler)", "launch calls", "kernels"], rows)
    notes = [f"{name}: {r['note']}" for name, r in report["results"].items() if r.get("note")]
    notes += [f"{name}: {k} {v}" for name, r in report["results"].items() for k, v in r.items() if k.endswith("_error")]
    return "\n".join([head, body] + notes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="llama-3.2-1b", choices=[*SHAPES, "tiny"], help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build (default 4)")
    p.add_argument("--fraction", type=float, default=1e-3, help="keystone fraction of neurons (default 0.001)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed steps per optimizer (default 50)")
    p.add_argument("--backend", default="auto", help="keystone backend (default auto)")
    p.add_argument("--out", default="gpu_hotpath.json", help="JSON file to write (default ./gpu_hotpath.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    print(table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 1 if any(r["status"] == "error" for r in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

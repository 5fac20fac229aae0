"""Train-step benchmark: forward + backward + optimizer, one fresh process per side.

Run as ``python -m keystone_kernels.bench.train '<TrainSpec JSON>'`` by :func:`run_train_subprocess`;
the worker prints one tagged JSON line with its result."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import ops
from ..integrations.lora import add_lora, lora_optimizer
from ..optim import KeystoneAdamW
from ..patching import patch
from ..state import keystone_parameters
from .baselines import apply_liger
from .cost import train_step_flops
from .shapes import SHAPES, Shape, build_model, synthetic_mask
from .timing import GIB, loadavg, measure, proc_field_bytes

RESULT_TAG = "KEYSTONE_BENCH_RESULT "


@dataclass
class TrainSpec:
    """One side of a train-step comparison, run by :func:`train_worker` in a fresh process."""

    shape: str
    side: str  # "dense", "dense-bf16", "keystone" or "lora" (PEFT LoRA of rank lora_r on the seven projections)
    device: str = "cpu"
    batch: int = 4
    seq: int = 128
    fraction: float = 1e-3
    backend: str = "auto"
    warmup: int = 1
    reps: int = 2
    seed: int = 0
    lora_r: int = 16
    liger: bool = False  # apply_liger_kernel_to_llama() before building the model (CUDA, Llama shapes)
    layers: int | None = None  # decoder layers to build (None: all of the shape's)
    linear_backend: str | None = None  # keystone: the patched layers' backend (weight grads), if not ``backend``
    compile: bool = False  # torch.compile(model) (inductor); keystone also KeystoneAdamW(capturable, compile_step)
    bf16_compute: bool = False  # keystone on the CPU: activations and GEMMs in bf16, as on CUDA (default: fp32)


SIDES = ("dense", "dense-bf16", "keystone", "lora")


def side_label(spec: TrainSpec) -> str:
    """What a row of :class:`TrainSpec` is, for tables: e.g. ``"dense AMP, compiled"``, ``"LoRA r=16, eager"``."""
    what = {"dense": "dense AMP" if spec.device == "cuda" else "dense fp32", "dense-bf16": "dense bf16",
            "keystone": f"keystone {100 * spec.fraction:g}%" + (" bf16" if spec.bf16_compute else ""),
            "lora": f"LoRA r={spec.lora_r}"}[spec.side]
    return f"{what}, {'compiled' if spec.compile else 'eager'}"


def _proc_status(field_name: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else None."""
    return proc_field_bytes("/proc/self/status", field_name)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_train_step(spec: TrainSpec) -> tuple[Callable[[], None], dict]:
    """One side of a train-step comparison: ``(step, info)``, ``step()`` = forward + backward + optimizer.

    dense: every parameter trainable, torch AdamW (foreach on CPU, fused on CUDA); fp32 on CPU,
    fp32 master weights with bf16 autocast on CUDA. keystone: the model built in bf16, then
    ``patch(model, mask, frozen_dtype=bf16)`` with a :func:`synthetic_mask` of ``spec.fraction``
    (embeddings / norms back to fp32 on CPU, where KeystoneLinear then computes in fp32, unless
    ``bf16_compute``; bf16 activations on CUDA), KeystoneAdamW. lora: PEFT LoRA of rank ``spec.lora_r`` (alpha 2 r, fp32
    adapters) on q, k, v, o, gate, up, down of a frozen base (CPU: fp32, CUDA: bf16 with bf16
    autocast), torch AdamW over the adapters (foreach / fused). Same random tokens (``labels =
    input_ids``) on every side. dense-bf16: every parameter trainable in bf16 (weights and AdamW
    moments), no autocast: the fastest dense step a user would try. ``spec.compile``: the model under
    ``torch.compile`` (inductor, the default mode); keystone's optimizer is then
    ``KeystoneAdamW(capturable=True, compile_step=True)`` (its device work in one graph), the others
    keep their fused / foreach torch AdamW. ``spec.liger``: Liger-Kernel's Llama kernels first (CUDA only).
    The optimizer is returned as ``step.optimizer``, the phases as ``step.forward()`` (returns the loss)
    and ``step.optimize()`` (``step`` + ``zero_grad``).
    """
    device = torch.device(spec.device)
    shape = SHAPES[spec.shape]
    if spec.liger:
        apply_liger(shape, device)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, shape.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    info: dict = {"spec": asdict(spec)}
    if spec.side in ("dense", "dense-bf16"):
        pure_bf16 = spec.side == "dense-bf16"  # bf16 weights and moments, no autocast; else fp32 masters
        model = build_model(shape, spec.layers, device=device, dtype=torch.bfloat16 if pure_bf16 else torch.float32,
                            seed=spec.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **kw)
        info.update(optimizer=f"torch AdamW({next(iter(kw))})" + (", bf16 states" if pure_bf16 else ""))
        autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and not pure_bf16
                    else contextlib.nullcontext)
    elif spec.side == "keystone":
        model = build_model(shape, spec.layers, device=device, dtype=torch.bfloat16, seed=spec.seed)
        mask = synthetic_mask(model, spec.fraction, spec.seed)
        patch(model, mask, frozen_dtype=torch.bfloat16, backend=spec.linear_backend or spec.backend,
              other_dtype=torch.float32 if device.type == "cpu" and not spec.bf16_compute else None)
        params = keystone_parameters(model)
        compiled = {"capturable": True, "compile_step": True} if spec.compile else {}
        opt = KeystoneAdamW(params, lr=1e-5, weight_decay=0.01, backend=spec.backend, **compiled)
        info.update(neurons=mask.num_neurons, backend=model._keystone.backend,
                    optimizer="KeystoneAdamW" + ("(capturable, compile_step)" if spec.compile else ""))
        autocast = contextlib.nullcontext
    elif spec.side == "lora":
        cuda = device.type == "cuda"
        model = build_model(shape, spec.layers, device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                            seed=spec.seed)
        add_lora(model, r=spec.lora_r)
        opt = lora_optimizer(model, lr=1e-5, weight_decay=0.01)
        params = [p for g in opt.param_groups for p in g["params"]]
        info.update(optimizer=f"torch AdamW({'fused' if cuda else 'foreach'})", lora_r=spec.lora_r,
                    base_dtype="bfloat16" if cuda else "float32")
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    else:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {spec.side!r}")
    model.train()
    info["trainable"] = sum(p.numel() for p in params)
    info["label"] = side_label(spec)
    run_model = torch.compile(model) if spec.compile else model

    def forward() -> torch.Tensor:
        with autocast():
            return run_model(input_ids=ids, labels=ids, use_cache=False).loss

    def optimize() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        forward().backward()
        optimize()

    # the phases, for profiles that time them apart (bench/gpu_trainprofile.py)
    step.forward, step.optimize = forward, optimize
    step.optimizer = opt
    return step, info


def train_worker(spec: TrainSpec) -> dict:
    """Build one side of a train step, time it and measure its peak memory (meant for a fresh process).

    Memory: CPU RSS right after imports (torch, Transformers, this package, the extension loaded on
    both sides), after setup, and its peaks (VmHWM over the whole process, and over the training
    alone after a reset where Linux allows); CUDA: bytes allocated after setup and the peak during
    the training steps (``max_memory_allocated``). Not ``ru_maxrss``: Linux carries it over from
    the parent through fork + exec, so a worker started by a large parent reports the parent's peak.
    """
    device = torch.device(spec.device)
    ops.resolve_backend(spec.backend, device)  # load the extension on both sides: same code resident
    if device.type == "cuda":
        torch.empty(1, device=device)  # CUDA context before the baseline
    gc.collect()
    rss_imports = _proc_status("VmRSS")
    step, info = build_train_step(spec)
    gc.collect()
    rss_setup, hwm_setup = _proc_status("VmRSS"), _proc_status("VmHWM")
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        alloc_setup = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()  # the first step: compiles, when compiled; builds the optimizer's state
    _sync(device)
    info["first_step_s"] = time.perf_counter() - t0
    graphs = _compiled_graphs()
    t = measure(step, device, warmup=max(0, spec.warmup - 1), reps=spec.reps)
    info["phases"] = phase_times(step, device)
    if spec.compile:  # no recompile after the first step (issue 20's target); a count that grew is one
        info["graphs_after_first_step"], info["graphs_after_timing"] = graphs, _compiled_graphs()
    info["optimizer_state_bytes"] = optimizer_state_bytes(step.optimizer)
    tokens = spec.batch * spec.seq
    hwm = _proc_status("VmHWM")
    info.update(time=t.as_dict(), tokens=tokens, tokens_per_s=tokens / t.median,
                rss_after_imports=rss_imports, rss_after_setup=rss_setup, peak_rss_setup=hwm_setup,
                peak_rss=max(hwm or 0, hwm_setup or 0), peak_rss_train=hwm if reset else None, loadavg=loadavg())
    if device.type == "cuda":
        info.update(memory_allocated_setup=alloc_setup, peak_allocated=torch.cuda.max_memory_allocated(device))
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_graphs() -> int | None:
    """Graphs dynamo has compiled in this process so far (None when dynamo was never imported)."""
    if "torch._dynamo" not in sys.modules:  # importing it costs seconds: only read when already loaded
        return None
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def phase_times(step: Callable[[], None], device: torch.device, reps: int = 3) -> dict[str, dict[str, float]]:
    """Median host and device seconds of each phase of ``step`` (forward, backward, optimizer).

    ``host_s``: the time until the phase's Python returns (on CUDA the kernels it queued may still
    run); ``device_s``: CUDA events around the phase, after a sync before it (None on the CPU, where
    host and device are one). A phase whose host time is close to its device time is bound by the host.
    """
    out: dict[str, list[tuple[float, float | None]]] = {"forward": [], "backward": [], "optimizer": []}
    cuda = device.type == "cuda"
    held: dict[str, torch.Tensor] = {}  # the forward's loss, for the backward
    phases = (("forward", lambda: held.__setitem__("loss", step.forward())),
              ("backward", lambda: held.pop("loss").backward()), ("optimizer", step.optimize))
    for _ in range(reps):
        for name, fn in phases:
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            if cuda:
                end.record()
                end.synchronize()
            out[name].append((host, start.elapsed_time(end) / 1e3 if cuda else None))
    return {name: {"host_s": statistics.median(h for h, _ in v),
                   "device_s": statistics.median(d for _, d in v) if cuda else None} for name, v in out.items()}


def worker_main(arg: str) -> None:
    spec = TrainSpec(**json.loads(arg))
    result = train_worker(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_train_subprocess(spec: TrainSpec, timeout: float = 1800) -> dict:
    """Run :func:`train_worker` in a fresh Python process and return its result dict."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "keystone_kernels.bench.train", json.dumps(asdict(spec))],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    raise RuntimeError(f"train-step worker ({spec.side}, {spec.shape}) failed with exit code "
                       f"{proc.returncode}:\n{tail}")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage region counted once (KeystoneAdamW's state are
    views of flat arenas, and its step counter is one tensor shared by every parameter of a group)."""
    seen = {(t.data_ptr(), t.numel() * t.element_size()) for s in optimizer.state.values() for t in s.values()
            if torch.is_tensor(t)}
    return sum(n for _, n in seen)


def _train_memory(r: dict, device: str) -> int:
    """The memory a train step needs: CUDA peak allocated; CPU peak RSS above the RSS right after imports."""
    if device == "cuda":
        return int(r["peak_allocated"])
    return int(r["peak_rss"] - r["rss_after_imports"])


def bench_train(shape: Shape, device: torch.device, batch: int, seq: int, cases: Sequence[tuple[float, str]],
                *, warmup: int = 1, reps: int = 2, seed: int = 0, log: Callable[[str], None] = print,
                lora_ranks: Sequence[int] = (), liger: bool = False, compiled: bool = False,
                deadline: float | None = None) -> dict:
    """Full train step: dense full fine-tuning vs keystone ``(fraction, backend)`` cases, one process each.

    ``lora_ranks``: PEFT LoRA rows beside them (``out["lora"]``); ``liger``: the first keystone case
    and LoRA r=16 again with Liger-Kernel applied (``out["liger"]``; CUDA, Llama shapes).
    ``compiled``: every side at its best too (``out["best"]``): dense, dense in pure bf16, the
    first keystone case and the first LoRA rank, each under ``torch.compile``, and on the CPU the
    first keystone case computing in bf16, eager and compiled. ``deadline``: a
    ``time.monotonic()`` after which no row starts (and none runs past it); a row that fails or does
    not fit costs only itself (``out["failed"]``), except dense and the keystone cases.
    """
    out = {"shape": shape.name, "device": device.type, "batch": batch, "seq": seq,
           "keystone": [], "lora": [], "liger": [], "best": []}
    common = dict(shape=shape.name, device=device.type, batch=batch, seq=seq, warmup=warmup, reps=reps, seed=seed)

    def timeout() -> float:
        return 1800 if deadline is None else min(1800.0, deadline - time.monotonic())

    def measured(r: dict, spec: TrainSpec) -> dict:
        r["memory_bytes"] = _train_memory(r, device.type)
        if spec.side != "lora":  # LoRA's FLOPs: cost.train_step_bound
            r["flops"] = train_step_flops(shape, batch, seq, None if spec.side.startswith("dense") else r["trainable"])
        return r

    dense_spec = TrainSpec(side="dense", **common)
    out["dense"] = dense = measured(run_train_subprocess(dense_spec, timeout()), dense_spec)
    log(f"train step: {shape.name}, batch {batch} x seq {seq}: dense {dense['time']['median']:.3f} s/step, "
        f"{dense['memory_bytes'] / GIB:.2f} GiB")
    for fraction, backend in cases:
        spec = TrainSpec(side="keystone", fraction=fraction, backend=backend, **common)
        r = measured(run_train_subprocess(spec, timeout()), spec)
        r["fraction"], r["backend_requested"] = fraction, backend
        out["keystone"].append(r)
        log(f"  keystone {100 * fraction:g}% {r['backend']}: {r['time']['median']:.3f} s/step, "
            f"{r['memory_bytes'] / GIB:.2f} GiB")
    extra = [("lora", dict(side="lora", lora_r=r)) for r in lora_ranks]
    if liger and cases:
        extra += [("liger", dict(side="keystone", fraction=cases[0][0], backend=cases[0][1], liger=True)),
                  ("liger", dict(side="lora", lora_r=16, liger=True))]
    if compiled:
        extra += [("best", dict(side="dense", compile=True)), ("best", dict(side="dense-bf16", compile=True))]
        if cases:
            first = dict(side="keystone", fraction=cases[0][0], backend=cases[0][1])
            extra.append(("best", dict(first, compile=True)))
            if device.type == "cpu":  # the CPU computes keystone in fp32 unless asked: bf16 is what dense-bf16 gets
                extra += [("best", dict(first, bf16_compute=True)),
                          ("best", dict(first, bf16_compute=True, compile=True))]
        if lora_ranks:
            extra.append(("best", dict(side="lora", lora_r=lora_ranks[0], compile=True)))
    for where, kw in extra:
        spec = TrainSpec(**kw, **common)
        what = side_label(spec) + (" + Liger" if spec.liger else "")
        left = timeout()
        if left < 10:
            log(f"  {what}: not run (the deadline has passed)")
            out.setdefault("failed", []).append({"row": what, "error": "not run: the run's deadline had passed"})
            continue
        try:  # a missing optional package (peft, liger-kernel) costs its row, not the dense and keystone ones
            r = measured(run_train_subprocess(spec, left), spec)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            log(f"  {what}: FAILED: {str(err).splitlines()[-1] if str(err) else err!r}")
            out.setdefault("failed", []).append({"row": what, "error": str(err)[-2000:]})
            continue
        out[where].append(r)
        log(f"  {what}: {r['time']['median']:.3f} s/step (first step {r.get('first_step_s', 0):.1f} s), "
            f"{r['memory_bytes'] / GIB:.2f} GiB, {r['trainable']:,} trainable")
    return out


if __name__ == "__main__":
    worker_main(sys.argv[1])

"""Host overhead of the eager keystone path against dense, on the CPU: what a GPU step waits on.

On a GPU the train step of a small batch is bound by the host (docs/design.md section 6): each
device op costs tens of microseconds of Python and dispatch, whatever its size. Two measures
predict that cost on any machine:

1. **Host time of one layer**: a KeystoneLinear forward + backward against ``nn.Linear``'s, on tiny
   shapes (the kernels take microseconds), one thread, per backend. Target (issue 20): <= 1.3x.
2. **Device ops per train step**: forward + backward + optimizer step + zero_grad of a 16-layer
   Llama-shaped model with tiny widths, dense (torch AdamW, every parameter) against keystone
   (as many neurons as 0.1% of Llama-3.2-1B, KeystoneAdamW), counted with
   :func:`keystone_kernels.utils.profiling.count_device_ops` (views and allocations left out; a
   custom op counts once). Target: keystone <= dense.

    python bench/host_overhead.py --out bench/results/host_overhead_cpu

Timings are medians of ``--repeats`` runs of ``--calls`` calls each; run with nothing else on the
machine (the ratio is what counts: both sides are timed alternately in the same process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from keystone_kernels import KeystoneAdamW, KeystoneLinear, keystone_parameters, patch
from keystone_kernels.bench.shapes import SHAPES, Shape, build_model, synthetic_mask
from keystone_kernels.bench.timing import machine_info
from keystone_kernels.ops import available_backends
from keystone_kernels.utils.io import atomic_write_text
from keystone_kernels.utils.profiling import count_device_ops
from keystone_kernels.utils.tables import format_table

# 16 layers like Llama-3.2-1B, widths small enough that the kernels cost nothing next to the host.
TINY_16 = Shape("tiny-16-layer", "llama", 64, 128, 16, 4, 2, 256, True)


def _per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean host time of one ``fn()`` in microseconds."""
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


# The paper's mapping gives a projection keystone rows (q / k / v / up) or columns (o / down), never both;
# Llama's projections have no bias.
LAYER_CASES = {"rows (q/k/v/up)": (torch.tensor([3, 17, 40]), torch.tensor([], dtype=torch.int64)),
               "columns (o/down)": (torch.tensor([], dtype=torch.int64), torch.tensor([5, 29]))}


def layer_host_time(backends: list[str], calls: int, repeats: int) -> list[dict]:
    """KeystoneLinear of a [48, 32] fp32 weight without bias against nn.Linear, x [4, 32] (needs its grad)."""
    torch.manual_seed(0)
    dense = nn.Linear(32, 48, bias=False)
    x = torch.randn(4, 32, requires_grad=True)

    def fwd_bwd(layer):
        return lambda: layer(x).sum().backward()

    out = []
    for backend in backends:
        for case, (rows, cols) in LAYER_CASES.items():
            layer = KeystoneLinear(dense.weight, None, rows, cols, frozen_dtype=torch.float32, backend=backend)
            base, ours = [], []
            for _ in range(3):  # alternate, so that drift of the machine hits both sides alike
                base.append(_per_call_us(fwd_bwd(dense), calls, repeats))
                ours.append(_per_call_us(fwd_bwd(layer), calls, repeats))
            b, k = statistics.median(base), statistics.median(ours)
            out.append({"backend": backend, "case": case, "nn_linear_us": b, "keystone_us": k, "ratio": k / b})
    return out


def _fraction_like_1b(model) -> float:
    """The fraction that gives ``model`` as many keystone neurons as 0.1% of Llama-3.2-1B (so that nearly
    every projection holds some, as there; 0.1% of the tiny widths would be a handful)."""
    big = synthetic_mask(build_model(SHAPES["llama-3.2-1b"]), 1e-3, 0).num_neurons  # meta device: no memory
    total = synthetic_mask(model, 1.0, 0).num_neurons
    return min(1.0, big / total)


def _train_step_ops(side: str, backend: str | None, frozen_dtype: torch.dtype) -> Counter:
    model = build_model(TINY_16, device="cpu", dtype=torch.float32, seed=0).train()
    ids = torch.randint(0, TINY_16.vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    if side == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    else:
        patch(model, synthetic_mask(model, _fraction_like_1b(model), 0), frozen_dtype=frozen_dtype, backend=backend,
              other_dtype=torch.float32)
        opt = KeystoneAdamW(keystone_parameters(model), lr=1e-5, weight_decay=0.01, backend=backend)

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()  # optimizer state and arenas exist: a steady-state step from here
    return count_device_ops(step)


def train_step_ops(backends: list[str]) -> list[dict]:
    rows = []
    dense = _train_step_ops("dense", None, torch.float32)
    rows.append({"side": "dense (torch AdamW foreach)", "ops": sum(dense.values()), "by_op": dict(dense)})
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            ops = _train_step_ops("keystone", backend, dtype)
            extra = {k: v - dense.get(k, 0) for k, v in ops.items() if v > dense.get(k, 0)}
            rows.append({"side": f"keystone {backend}, frozen {str(dtype).removeprefix('torch.')}",
                         "ops": sum(ops.values()), "ratio": sum(ops.values()) / sum(dense.values()),
                         "more_than_dense": extra, "by_op": dict(ops)})
    return rows


def render(report: dict) -> str:
    lines = ["KeystoneLinear forward + backward host time, tiny shapes, 1 thread (target <= 1.3x nn.Linear)", ""]
    lines.append(format_table(["backend", "keystone", "nn.Linear us", "KeystoneLinear us", "ratio"],
                              [(r["backend"], r["case"], f"{r['nn_linear_us']:.1f}", f"{r['keystone_us']:.1f}",
                                f"{r['ratio']:.2f}x") for r in report["layer"]], markdown=True))
    lines += ["", f"Device ops per train step, {TINY_16.name} (16 layers), batch 2 x 32 (target keystone <= dense)", ""]
    lines.append(format_table(["side", "ops / step", "x dense", "ops above dense's count"],
                              [(r["side"], r["ops"], f"{r.get('ratio', 1.0):.2f}",
                                ", ".join(f"{k} +{v}" for k, v in sorted(r.get("more_than_dense", {}).items())))
                               for r in report["ops"]], markdown=True))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/host_overhead_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backends = [b for b in ("reference", "ext") if b in available_backends("cpu")]
    report = {"machine": machine_info(torch.device("cpu")), "threads": 1,
              "layer": layer_host_time(backends, args.calls, args.repeats), "ops": train_step_ops(backends)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "host_overhead.json", json.dumps(report, indent=1))
    text = render(report)
    atomic_write_text(out / "host_overhead.md", text)
    print(text)


if __name__ == "__main__":
    main()

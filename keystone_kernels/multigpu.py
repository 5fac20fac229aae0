"""Multi-GPU arithmetic: communication per step and memory per GPU, keystone against dense, from shapes.

No measurement here: bytes and memory follow from the model's shapes and a synthetic keystone mask
(``bench.shapes.synthetic_mask``, the benchmarks' masks). The distributed tests check the model on a
tiny model: a DDP comm hook sees exactly :func:`ddp_gradient_bytes`, DDP broadcasts 0 bytes per
forward, and FSDP2 keeps ``1/N`` of the frozen weights per rank. ``keystone-kernels multigpu``
prints the tables and writes them (JSON and markdown) into ``--out``.

Conventions (bytes): keystone tensors are fp32 (4 B each for master, gradient, exp_avg, exp_avg_sq:
16 B per keystone value), frozen weights bf16 (2 B); dense mixed-precision AdamW holds a bf16
weight, fp32 master, gradient and two moments (18 B per parameter) and reduces fp32 gradients.
A ring all-reduce of B bytes sends and receives ``2 (N - 1) / N * B`` per GPU; an all-gather or a
reduce-scatter of B bytes (the whole tensor) ``(N - 1) / N * B``. FSDP2 gathers every layer's
weights twice per step (forward, and again for backward, with ``reshard_after_forward=True``).
Activations, temporaries and the allocator's slack are left out of the memory figures.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bench.shapes import SHAPES, Shape, build_model, synthetic_mask

__all__ = ["Figures", "figures", "ddp_gradient_bytes", "report", "add_multigpu_command", "LLAMA_70B"]

_GB = 1e9


def _llama_70b():
    return Shape("llama-3.1-70b", "llama", 8192, 28672, 80, 64, 8, 128256, False)


LLAMA_70B = "llama-3.1-70b"


def ddp_gradient_bytes(mask, model) -> int:
    """Bytes DDP all-reduces per step for a model patched with ``mask``: 4 per keystone value (fp32 grads)."""
    return 4 * mask.num_parameters(model)


@dataclass
class Figures:
    """One (shape, keystone fraction, number of GPUs) row; every size in bytes."""

    shape: str
    fraction: float
    gpus: int
    params: int
    keystone_params: int
    # DDP, per step
    ddp_keystone_grad_bytes: int  # what enters the all-reduce (the comm hook's buckets)
    ddp_full_grad_bytes: int  # dense DDP on the same model, fp32 gradients
    ddp_frozen_broadcast_bytes: int  # per forward: 0, patch marks the buffers for DDP to ignore
    ddp_unmarked_broadcast_bytes: int  # what DDP's default would broadcast per forward without the marks (bf16)
    ddp_keystone_wire_bytes: float  # sent per GPU by a ring all-reduce
    ddp_full_wire_bytes: float
    # FSDP2, per step and per GPU
    fsdp_gather_bytes: float  # frozen bf16 weights all-gathered (forward + backward), received per GPU
    fsdp_keystone_wire_bytes: float  # the one flat all-reduce of keystone gradients
    fsdp_dense_wire_bytes: float  # dense FSDP: the same gathers plus a reduce-scatter of fp32 gradients
    # memory per GPU (weights + training state)
    frozen_bytes_per_gpu_fsdp: float  # 2 B x params / N
    keystone_state_bytes: int  # 16 B x keystone values, replicated on every GPU
    layer_buffer_bytes: int  # two unsharded layers in flight (current + prefetched), bf16
    keystone_fsdp_bytes_per_gpu: float
    keystone_ddp_bytes_per_gpu: float
    dense_fsdp_bytes_per_gpu: float
    dense_ddp_bytes_per_gpu: float


def _shape(name: str):
    return _llama_70b() if name == LLAMA_70B else SHAPES[name]


def figures(shape_name: str, fraction: float, gpus: int = 8, seed: int = 0) -> Figures:
    """The communication and memory of one shape at one keystone fraction on ``gpus`` GPUs."""
    shape = _shape(shape_name)
    model = build_model(shape, device="meta")  # shapes only
    mask = synthetic_mask(model, fraction, seed)
    keystone = mask.num_parameters(model)
    params = shape.total_params
    n = gpus
    ring, gather = 2 * (n - 1) / n, (n - 1) / n
    layer = shape.projection_params_per_layer + 2 * shape.hidden
    grad_keystone, grad_full = 4 * keystone, 4 * params
    frozen_fsdp = 2 * params / n
    state = 16 * keystone
    buffers = 2 * 2 * layer
    gathers = 2 * gather * 2 * params
    return Figures(
        shape=shape_name, fraction=fraction, gpus=n, params=params, keystone_params=keystone,
        ddp_keystone_grad_bytes=grad_keystone, ddp_full_grad_bytes=grad_full, ddp_frozen_broadcast_bytes=0,
        ddp_unmarked_broadcast_bytes=2 * shape.projection_params,
        ddp_keystone_wire_bytes=ring * grad_keystone, ddp_full_wire_bytes=ring * grad_full,
        fsdp_gather_bytes=gathers, fsdp_keystone_wire_bytes=ring * grad_keystone,
        fsdp_dense_wire_bytes=gathers + gather * grad_full,
        frozen_bytes_per_gpu_fsdp=frozen_fsdp, keystone_state_bytes=state, layer_buffer_bytes=buffers,
        keystone_fsdp_bytes_per_gpu=frozen_fsdp + state + buffers, keystone_ddp_bytes_per_gpu=2 * params + state,
        dense_fsdp_bytes_per_gpu=18 * params / n + buffers, dense_ddp_bytes_per_gpu=18 * params,
    )


def _gb(x: float) -> str:
    if x < 1e8:
        return f"{x / 1e6:.3g} MB"
    return f"{x / _GB:.3g} GB" if x < 1e11 else f"{x / _GB:,.0f} GB"


def report(rows: list[Figures]) -> str:
    """Three markdown tables: DDP traffic per step, FSDP2 traffic per GPU per step, memory per GPU."""
    lines = ["DDP, per step (what enters the all-reduce; a ring sends 2 (N - 1) / N of it per GPU):", "",
             "| shape | keystone | keystone gradients | full DDP gradients | ratio "
             "| frozen bytes broadcast per forward | (without patch's DDP marks) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {100 * r.fraction:g}% ({r.keystone_params:,} values) | "
                     f"{_gb(r.ddp_keystone_grad_bytes)} | {_gb(r.ddp_full_grad_bytes)} | "
                     f"{r.ddp_full_grad_bytes / r.ddp_keystone_grad_bytes:,.0f}x | {r.ddp_frozen_broadcast_bytes} | "
                     f"({_gb(r.ddp_unmarked_broadcast_bytes)}) |")
    lines += ["", f"FSDP2 on {rows[0].gpus} GPUs, received per GPU per step:", "",
              "| shape | keystone | frozen weights all-gathered (forward + backward) | keystone all-reduce | "
              "dense FSDP (gathers + fp32 gradient reduce-scatter) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {100 * r.fraction:g}% | {_gb(r.fsdp_gather_bytes)} | "
                     f"{_gb(r.fsdp_keystone_wire_bytes)} | {_gb(r.fsdp_dense_wire_bytes)} |")
    lines += ["", f"Memory per GPU on {rows[0].gpus} GPUs (weights and training state; activations not included):", "",
              "| shape | keystone | keystone FSDP2 | of which frozen (1/N) | keystone state | two unsharded layers | "
              "keystone DDP | dense FSDP | dense DDP |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {100 * r.fraction:g}% | {_gb(r.keystone_fsdp_bytes_per_gpu)} | "
                     f"{_gb(r.frozen_bytes_per_gpu_fsdp)} | {_gb(r.keystone_state_bytes)} | "
                     f"{_gb(r.layer_buffer_bytes)} | "
                     f"{_gb(r.keystone_ddp_bytes_per_gpu)} | {_gb(r.dense_fsdp_bytes_per_gpu)} | "
                     f"{_gb(r.dense_ddp_bytes_per_gpu)} |")
    return "\n".join(lines)


DEFAULT_SHAPES = ("smollm2-135m", "llama-3.1-8b", LLAMA_70B)


def cmd_multigpu(args) -> int:
    fractions = [float(x) / 100 for x in args.percent.split(",")]
    rows = [figures(s, f, args.gpus) for s in args.shapes.split(",") for f in fractions]
    text = report(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers  # the version, for the record (seconds to import)

    info = {"computed_from": "model shapes and synthetic masks (bench.shapes.synthetic_mask, seed 0); nothing timed",
            "torch": torch.__version__, "transformers": transformers.__version__}
    (out / "multigpu.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "multigpu.md").write_text(text + "\n")
    print(f"written: {out / 'multigpu.json'}, {out / 'multigpu.md'}")
    return 0


def add_multigpu_command(sub) -> None:
    p = sub.add_parser("multigpu", help="communication per step and memory per GPU, keystone vs dense (from shapes)")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma-separated (default {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--percent", default="0.1,1", help="keystone fractions of the neurons, in percent (default 0.1,1)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs N (default 8)")
    p.add_argument("--out", default="bench-out", help="folder for multigpu.json / multigpu.md (default bench-out)")
    p.set_defaults(func=cmd_multigpu)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="keystone-kernels")
    add_multigpu_command(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    raise SystemExit(parsed.func(parsed))

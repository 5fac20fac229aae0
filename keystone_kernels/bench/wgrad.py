"""Weight-gradient benchmark: the gather kernels against the dense dW GEMMs of one decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from .cost import wgrad_flops
from .shapes import Shape, build_model, layer_mask, projection_path
from .timing import measure, peak_bytes

# A weight-gradient variant timed beside the Triton kernel (GPU): gather dY's keystone columns with
# index_select, then one cuBLAS GEMM in the activations' dtype (fp32 accumulation), cast to fp32.
WGRAD_MM = "index_select+mm"


def index_select_mm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return torch.mm((dy if rows is None else dy.index_select(1, rows)).t(), x).float()


@dataclass
class WgradCase:
    """Activations ``X`` and output grads ``dY`` of the seven projections of one decoder layer.

    CPU: fp32 (the CPU path computes in fp32); CUDA: bf16 (the activations of a bf16 model).
    """

    shape: Shape
    tokens: int
    device: torch.device
    meta: object
    xs: dict[str, torch.Tensor]
    dys: dict[str, torch.Tensor]

    @classmethod
    def build(cls, shape: Shape, tokens: int, device: str | torch.device, seed: int = 0) -> WgradCase:
        device = torch.device(device)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        gen = torch.Generator(device=device).manual_seed(seed)
        xs, dys = {}, {}
        for n, o, i in shape.projections():
            xs[n] = torch.randn(tokens, i, generator=gen, device=device, dtype=dtype)
            dys[n] = torch.randn(tokens, o, generator=gen, device=device, dtype=dtype)
        return cls(shape, tokens, device, build_model(shape, 1), xs, dys)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.xs.values())).dtype

    @property
    def dense_flops(self) -> int:
        return sum(wgrad_flops(self.tokens, o, i) for _, o, i in self.shape.projections())

    def dense_fn(self) -> Callable[[], list]:
        """The dense weight gradients ``dY^T X`` of every projection (in the activations' dtype)."""
        names = [n for n, _, _ in self.shape.projections()]
        return lambda: [self.dys[n].t() @ self.xs[n] for n in names]

    def keystone_fn(self, fraction: float, backend: str, seed: int = 0) -> tuple[Callable[[], list], int, int]:
        """``(fn, keystone params, FLOPs)``: the gather weight gradients of :func:`layer_mask`'s
        neurons, as KeystoneLinear's backward runs them (``X[:, C]`` saved by the forward for a
        columns-only layer, gathered in the backward otherwise). ``backend`` may also be
        :data:`WGRAD_MM`."""
        if backend == WGRAD_MM:
            gather = index_select_mm
        else:
            def gather(dy, x, rows):
                return ops.gather_wgrad(dy, x, rows, None, backend=backend)

        indices = layer_mask(self.meta, fraction, 0, seed).weight_indices(self.meta)
        work, flops, params = [], 0, 0
        for n, o, i in self.shape.projections():
            ind = indices.get(projection_path(0, n))
            if ind is None:
                continue
            rows, cols = ind.rows.to(self.device), ind.cols.to(self.device)
            col_rows = None
            if len(rows) and len(cols):
                keep = torch.ones(o, dtype=torch.bool, device=self.device)
                keep[rows] = False
                col_rows = keep.nonzero().flatten()
            xc = self.xs[n].index_select(1, cols) if len(cols) and not len(rows) else None
            work.append((self.dys[n], self.xs[n], rows, cols, col_rows, xc))
            flops += wgrad_flops(self.tokens, o, i, len(rows), len(cols))
            params += len(rows) * i + (o - len(rows)) * len(cols)

        def fn():
            res = []
            for dy, x, rows, cols, col_rows, xc in work:
                if len(rows):
                    res.append(gather(dy, x, rows))
                if len(cols):
                    x_c = xc if xc is not None else x.index_select(1, cols)
                    res.append(gather(dy, x_c, col_rows))
            return res

        return fn, params, flops


def bench_wgrad(shape: Shape, fractions: Sequence[float], backends: Sequence[str], device: torch.device, tokens: int,
                *, warmup: int = 1, reps: int = 3, seed: int = 0, min_time_s: float = 0.2,
                log: Callable[[str], None] = print) -> dict:
    """Gather weight gradients (what KeystoneLinear's backward runs) vs the dense dW GEMMs of one layer.

    Memory of each side: the peak its gradient outputs (and temporaries) allocate. Where Triton is
    timed, :data:`WGRAD_MM` (index_select + torch.mm) is timed beside it; on CUDA, the reference too.
    """
    case = WgradCase.build(shape, tokens, device, seed)
    dense = case.dense_fn()
    peak = peak_bytes(dense, device)
    t = measure(dense, device, warmup=warmup, reps=reps, min_time_s=min_time_s)
    flops = case.dense_flops
    out = {"shape": shape.name, "tokens": tokens, "dtype": str(case.dtype).replace("torch.", ""), "device": device.type,
           "dense": {"time": t.as_dict(), "flops": flops, "flops_per_s": flops / t.median, "memory_bytes": peak},
           "keystone": []}
    log(f"weight grad: {shape.name} layer 0, {tokens} tokens: dense {t.median * 1e3:.1f} ms")
    variants = list(backends) + ([WGRAD_MM] if "triton" in backends else [])
    if torch.device(device).type == "cuda" and "reference" not in variants:
        variants.append("reference")  # on CUDA one tensor-core GEMM with an fp32 result (ops/reference.py)
    for f in fractions:
        for backend in variants:
            fn, params, kflops = case.keystone_fn(f, backend, seed)
            kpeak = peak_bytes(fn, device)
            kt = measure(fn, device, warmup=warmup + 1, reps=max(reps, 5), min_time_s=min_time_s)
            out["keystone"].append({"fraction": f, "backend": backend, "params": params, "flops": kflops,
                                    "time": kt.as_dict(), "flops_per_s": kflops / kt.median, "memory_bytes": kpeak})
            log(f"  keystone {100 * f:g}% {backend}: {kt.median * 1e3:.2f} ms")
    return out

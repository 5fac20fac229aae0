"""Optimizer-step benchmarks: KeystoneAdamW against torch AdamW, and the host work per keystone tensor."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..nn.linear import KeystoneLinear
from ..optim import KeystoneAdamW
from .cost import dense_adamw_bytes, keystone_step_bytes, keystone_tensor_layout, scatter_written_bytes
from .shapes import Shape, build_model, projection_path, synthetic_mask
from .timing import GIB, count_launches, measure, peak_bytes


@dataclass
class OptimizerCase:
    """Frozen bf16 projection weights of the first ``layers`` layers of a shape (both sides start here).

    ``meta``: the model on the meta device (mask geometry without memory); ``frozen``: path ->
    ``[out, in]`` bf16 weight on ``device``.
    """

    shape: Shape
    layers: int
    device: torch.device
    meta: object
    frozen: dict[str, torch.Tensor]

    @classmethod
    def build(cls, shape: Shape, layers: int, device: str | torch.device, seed: int = 0) -> OptimizerCase:
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        frozen = {}
        for i in range(layers):
            for name, o, k in shape.projections():
                frozen[projection_path(i, name)] = (torch.randn(o, k, generator=gen, device=device)
                                                     * 0.02).to(torch.bfloat16)
        return cls(shape, layers, device, build_model(shape, layers), frozen)

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.frozen.values())

    def mask(self, fraction: float, seed: int = 0):
        return synthetic_mask(self.meta, fraction, seed)

    def dense(self, fraction: float, seed: int = 0) -> DenseAdamWSetup:
        """fp32 copies of the weights with random gradients, and the bool masks of ``fraction``'s mask."""
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        indices = self.mask(fraction, seed).weight_indices(self.meta)
        weights, masks = [], []
        for path, w in self.frozen.items():
            p = torch.nn.Parameter(w.float())
            p.grad = torch.randn(w.shape, generator=gen, device=self.device)
            m = torch.zeros(w.shape, dtype=torch.bool, device=self.device)
            ind = indices.get(path)
            if ind is not None:  # rows own whole rows, columns the rest: together all of R x : and : x C
                m[ind.rows.to(self.device)] = True
                m[:, ind.cols.to(self.device)] = True
            weights.append(p)
            masks.append(m)
        return DenseAdamWSetup(weights, masks)

    def keystone(self, fraction: float, backend: str, seed: int = 0) -> KeystoneSetup:
        """KeystoneLinear modules over the frozen weights (shared, not copied) with random keystone grads."""
        mask = self.mask(fraction, seed)
        indices = mask.weight_indices(self.meta)
        empty = torch.empty(0, dtype=torch.int64)
        modules, layout = [], []
        for path, w in self.frozen.items():
            ind = indices.get(path)
            rows, cols = (ind.rows, ind.cols) if ind else (empty, empty)
            modules.append(KeystoneLinear(w, None, rows, cols, w.dtype, backend))  # bf16 contiguous w: kept, no copy
            layout += keystone_tensor_layout(w.shape[0], w.shape[1], len(rows), len(cols))
        params = [p for m in modules for p in m.keystone_parameters()]
        gen = torch.Generator(device=self.device).manual_seed(seed + 2)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=self.device)
        return KeystoneSetup(mask, modules, params, layout)


@dataclass
class DenseAdamWSetup:
    """fp32 weights with gradients, and one bool mask per weight (True: keystone element)."""

    weights: list
    masks: list

    @property
    def grads(self) -> list:
        return [w.grad for w in self.weights]

    def resident_bytes(self, masked: bool) -> int:
        return (sum(2 * w.numel() * w.element_size() for w in self.weights)
                + (sum(m.numel() for m in self.masks) if masked else 0))

    def step_fn(self, impl: str, masked: bool) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
        """A fresh ``torch.optim.AdamW`` (``impl``: "foreach" or "fused") and its step; ``masked``:
        zero the non-keystone gradients first, as the paper's training does after every backward."""
        opt = torch.optim.AdamW(self.weights, lr=1e-5, weight_decay=0.01, **{impl: True})
        grads, masks = self.grads, self.masks

        def step():
            if masked:
                with torch.no_grad():
                    torch._foreach_mul_(grads, masks)
            opt.step()

        return opt, step


@dataclass
class KeystoneSetup:
    """KeystoneLinear modules of one mask, their keystone parameters (with grads) and the tensor layout."""

    mask: object
    modules: list
    params: list
    layout: list  # (n, m, rows, cols) per keystone tensor, see keystone_tensor_layout

    def resident_bytes(self) -> int:
        frozen = sum(m.frozen_weight.numel() * m.frozen_weight.element_size() for m in self.modules)
        return frozen + sum(2 * p.numel() * p.element_size() for p in self.params)  # + fp32 masters and grads

    def optimizer(self, backend: str):
        return KeystoneAdamW(self.params, lr=1e-5, weight_decay=0.01, backend=backend)

    def write_amplification(self) -> float:
        """Cache-line bytes the optimizer's scatters write over the bytes of the values they store
        (:func:`~keystone_kernels.bench.cost.scatter_written_bytes`, over every keystone tensor)."""
        written = useful = 0
        for m in self.modules:
            for w in m.writes():
                t = m.frozen_2d(w)
                written += scatter_written_bytes(w.rows, w.cols, tuple(t.shape), t.stride(), t.element_size())
                useful += w.param.numel() * t.element_size()
        return written / useful if useful else 1.0


def fit_layers(shape: Shape, budget: int, bytes_per_weight: float = 26) -> int:
    """Decoder layers whose projections fit ``budget`` bytes at ``bytes_per_weight`` (dense AdamW:
    fp32 weight, grad, m, v, bool mask = 17 B, foreach temporaries ~4-8 B, and the bf16 frozen copy)."""
    return min(shape.layers, int(budget // (shape.projection_params_per_layer * bytes_per_weight)))


DENSE_IMPLS = ("foreach", "fused")


def bench_optimizer(shape: Shape, fractions: Sequence[float], backends: Sequence[str], device: torch.device,
                    *, warmup: int = 1, reps: int = 3, budget: int, bandwidth: float | None = None, seed: int = 0,
                    min_time_s: float = 0.3, log: Callable[[str], None] = print) -> dict:
    """KeystoneAdamW vs torch AdamW over the projection weights of ``shape`` (as many layers as fit).

    Both sides step the same layers: the dense baseline needs ~17 B per weight (fp32 weight, grad,
    m, v, bool mask) plus foreach temporaries, the keystone side 2 B (bf16 frozen) plus its tiny
    state, so a large shape is cut to its first layers within ``budget`` bytes; both costs grow
    linearly with the layers, so the ratio is that of the whole model. Memory of each side: what
    must be resident before the step (weights, grads, masks) plus the peak the first step allocates
    (optimizer state, temporaries).
    """
    layers = fit_layers(shape, budget)
    if layers < 1:
        return {"shape": shape.name,
                "skipped": f"one layer needs {shape.projection_params_per_layer * 26 / GIB:.1f} GiB "
                           f"> budget {budget / GIB:.1f} GiB"}
    case = OptimizerCase.build(shape, layers, device, seed)
    numel = case.numel
    out = {"shape": shape.name, "layers": layers, "of_layers": shape.layers, "weights": numel, "device": device.type,
           "dense": {}, "keystone": []}
    log(f"optimizer step: {shape.name}, {layers} of {shape.layers} layers, {numel / 1e6:.1f}M projection weights")

    # dense: the gradients are masked by the 0.1% mask (its time does not depend on the fraction)
    dense = case.dense(1e-3 if 1e-3 in fractions else fractions[0], seed)
    for impl in DENSE_IMPLS:
        for masked in (True, False):
            name = f"{'masked_' if masked else ''}{impl}"
            opt, step = dense.step_fn(impl, masked)
            try:
                peak = peak_bytes(step, device)  # the first step allocates m and v
                t = measure(step, device, warmup=warmup, reps=reps)
            except RuntimeError as err:  # e.g. no fused AdamW on this device
                log(f"  dense {name}: skipped ({err})")
                continue
            finally:
                del opt
            launches = count_launches(step) if device.type == "cuda" else None
            moved = dense_adamw_bytes(numel, masked)
            out["dense"][name] = {
                "time": t.as_dict(), "memory_bytes": dense.resident_bytes(masked) + peak,
                "bytes_model": moved, "bandwidth": moved / t.median,
                "bandwidth_fraction": moved / t.median / bandwidth if bandwidth else None, "launches": launches,
            }
            log(f"  dense {name}: {t.median * 1e3:.1f} ms")
            del step
    del dense
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # keystone: one mask per fraction over the same frozen weights, one optimizer per backend
    for f in fractions:
        ks = case.keystone(f, backends[0], seed)
        n_params = sum(p.numel() for p in ks.params)
        amplification = ks.write_amplification()
        for backend in backends:
            opt = ks.optimizer(backend)
            peak = peak_bytes(opt.step, device)
            t = measure(opt.step, device, warmup=warmup + 1, reps=max(reps, 5), min_time_s=min_time_s)
            launches = count_launches(opt.step) if device.type == "cuda" else None
            moved = keystone_step_bytes(ks.layout)
            out["keystone"].append({
                "fraction": f, "backend": backend, "neurons": ks.mask.num_neurons, "params": n_params,
                "param_fraction": n_params / numel, "time": t.as_dict(), "memory_bytes": ks.resident_bytes() + peak,
                "bytes_model": moved, "bandwidth": moved / t.median,
                "bandwidth_fraction": moved / t.median / bandwidth if bandwidth else None, "launches": launches,
                "write_amplification": amplification,
            })
            log(f"  keystone {100 * f:g}% {backend}: {n_params} params, {t.median * 1e3:.2f} ms")
            del opt
        del ks
    return out


HOST_COUNTS = (24, 384)  # keystone tensors of the two layouts whose step times give the per-tensor slope


def host_layout(tensors: int, backend: str, device: torch.device, seed: int = 0) -> tuple[list, list]:
    """(modules, params): ``tensors`` tiny keystone tensors (rows [2, 8] and columns [14, 2] of [16, 8]
    bf16 weights) with grads; keep the modules alive while stepping the params.

    Kernel time is negligible at these sizes, so a step's time is its host work.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = [KeystoneLinear(torch.randn(16, 8, generator=gen), None, torch.tensor([1, 9]), torch.tensor([3, 5]),
                              torch.bfloat16, backend).to(device) for _ in range(tensors // 2)]
    params = [p for m in modules for p in m.keystone_parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return modules, params


def bench_host(backends: Sequence[str], device: torch.device, *, counts: Sequence[int] = HOST_COUNTS,
               capturable: Sequence[bool] = (False, True), reps: int = 30, log: Callable[[str], None] = print) -> dict:
    """Time of one ``KeystoneAdamW.step()`` over many tiny tensors: the host cost per extra tensor.

    The slope between the two layouts (``counts``) is what each extra keystone tensor adds to a
    step; an optimizer with O(1) host work per step has a slope near zero.
    """
    out = {"device": device.type, "counts": list(counts), "rows": []}
    for backend in backends:
        for capt in capturable:
            times = {}
            for n in counts:
                modules, params = host_layout(n, backend, device)
                opt = KeystoneAdamW(params, lr=1e-4, backend=backend, capturable=capt)
                opt.step()  # builds the flat layout
                times[str(n)] = measure(opt.step, device, warmup=3, reps=reps, min_time_s=0.2).as_dict()  # JSON keys
                del opt, params, modules
            lo, hi = counts[0], counts[-1]
            slope = (times[str(hi)]["median"] - times[str(lo)]["median"]) / (hi - lo)
            out["rows"].append({"backend": backend, "capturable": capt, "times": times, "slope_s": slope})
            log(f"host work: {backend}{' capturable' if capt else ''}: {times[str(lo)]['median'] * 1e6:.0f} us at "
                f"{lo} tensors, {times[str(hi)]['median'] * 1e6:.0f} us at {hi}: {slope * 1e6:.2f} us per extra tensor")
    return out

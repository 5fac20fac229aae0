"""Benchmarks against dense AdamW: optimizer step, weight gradient, full train step, memory, roofline.

Everything is measured side by side in one run and reported as ratios (docs/design.md section 8), on
the shapes of real models built from Transformers configs with random weights (nothing is ever
downloaded):

- **optimizer step**: :class:`~keystone_kernels.KeystoneAdamW` over the keystone tensors of every
  projection against ``torch.optim.AdamW`` (foreach and fused) over the full projection weights,
  with the gradients masked first (what a user of the paper's code runs: dense AdamW, non-keystone
  gradients zeroed after backward) and without masking (plain dense fine-tuning);
- **weight gradient**: the gather kernels (``ops.gather_wgrad``, what ``KeystoneLinear`` runs in
  backward) against the dense ``dW = dY^T X`` GEMMs of one decoder layer;
- **train step** (forward + backward + optimizer): a patched model with KeystoneAdamW against
  dense full fine-tuning with torch AdamW, in a fresh subprocess per side so that peak memory
  (RSS on CPU, ``max_memory_allocated`` on CUDA) belongs to that side alone;
- **roofline**: bytes moved by each optimizer step (:func:`keystone_step_bytes`,
  :func:`dense_adamw_bytes`) over the measured device bandwidth, FLOPs of the weight gradient
  (:func:`wgrad_flops`) and of a train step (:func:`train_step_flops`), kernel launches per step
  on CUDA.

The CLI (``keystone-kernels bench``) and the pytest-benchmark suites in ``bench/`` both build on
the functions here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

FRACTIONS = (1e-4, 1e-3, 1e-2, 5e-2)
_RESULT_TAG = "KEYSTONE_BENCH_RESULT "
_GIB = 1024**3


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """The sizes of a real model (weights are random; only the shapes matter for speed and memory)."""

    name: str
    family: str  # "llama" or "qwen3"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    head_dim: int | None = None  # None: hidden // heads (Llama); Qwen3 sets its own

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def projections(self) -> list[tuple[str, int, int]]:
        """``(name, out, in)`` of the seven projections of one decoder layer, ``nn.Linear`` terms."""
        q, kv, h, i = self.heads * self.dim_head, self.kv_heads * self.dim_head, self.hidden, self.intermediate
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    @property
    def projection_params_per_layer(self) -> int:
        return sum(o * i for _, o, i in self.projections())

    @property
    def projection_params(self) -> int:
        return self.layers * self.projection_params_per_layer

    @property
    def total_params(self) -> int:
        """Every parameter of the model: projections, embeddings (and an untied lm_head), RMSNorms."""
        norms = self.layers * 2 * self.hidden + self.hidden
        if self.family == "qwen3":
            norms += self.layers * 2 * self.dim_head  # q_norm / k_norm
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.projection_params + embed + norms

    def config(self, layers: int | None = None):
        """A Transformers config of this shape (``layers`` overrides the number of decoder layers)."""
        kw = dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=layers or self.layers,
                  num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                  tie_word_embeddings=self.tie_embeddings, max_position_embeddings=4096, use_cache=False)
        if self.family == "qwen3":
            from transformers import Qwen3Config

            return Qwen3Config(head_dim=self.dim_head, **kw)
        from transformers import LlamaConfig

        return LlamaConfig(head_dim=self.dim_head, **kw)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, True),
    Shape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True),
    Shape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, False),
    Shape("qwen3-0.6b", "qwen3", 1024, 3072, 28, 16, 8, 151936, True, head_dim=128),
)}


def build_model(shape: Shape, layers: int | None = None, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32, seed: int = 0):
    """A causal LM of ``shape`` with random weights (``device="meta"``: shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(layers), dtype=dtype)
    return model


# --------------------------------------------------------------------------- synthetic masks


def synthetic_mask(model, fraction: float, seed: int = 0, layers: Iterable[int] | None = None):
    """A random mask holding ``fraction`` of the neurons of the paper's six types.

    ``n = max(1, round(fraction * total))`` neurons are drawn uniformly from the union of every
    (type, layer) index space (of ``layers`` only, when given), so each space holds ``fraction``
    of its neurons in expectation, also where ``fraction * size < 1``.
    """
    from . import arch
    from .mask import KeystoneMask

    keys = arch.neuron_keys(model, arch.family_for(model), None)
    if layers is not None:
        wanted = set(layers)
        keys = {k: s for k, s in keys.items() if k[1] in wanted}
    names = list(keys)
    sizes = torch.tensor([keys[k].size for k in names], dtype=torch.int64)
    total = int(sizes.sum())
    n = min(total, max(1, round(fraction * total)))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=gen)[:n]
    starts = torch.cumsum(sizes, 0) - sizes
    which = torch.searchsorted(starts, picks, right=True) - 1
    local = picks - starts[which]
    neurons = {names[i]: local[which == i] for i in torch.unique(which).tolist()}
    return KeystoneMask(neurons, {"synthetic": True, "fraction": fraction, "seed": seed, "total_neurons": total})


def layer_mask(model, fraction: float, layer: int = 0, seed: int = 0):
    """``max(1, round(fraction * size))`` random neurons of every type in one layer (weight-grad bench)."""
    from . import arch
    from .mask import KeystoneMask

    gen = torch.Generator().manual_seed(seed)
    keys = {k: s for k, s in arch.neuron_keys(model, arch.family_for(model), None).items() if k[1] == layer}
    return KeystoneMask({k: torch.randperm(s.size, generator=gen)[: max(1, round(fraction * s.size))] for k, s in keys.items()},
                        {"synthetic": True, "fraction": fraction, "seed": seed, "layer": layer})


# --------------------------------------------------------------------------- cost models


def keystone_tensor_layout(out_features: int, in_features: int, n_rows: int, n_cols: int) -> list[tuple[int, int, int | None, int | None]]:
    """The keystone tensors of one ``[out, in]`` weight with |R| = n_rows, |C| = n_cols (docs/design.md section 1).

    Each entry is ``(n, m, row_indices, col_indices)``: an ``[n, m]`` fp32 tensor and the lengths of
    the index tensors its scatter reads (None: "all, in order", nothing read). A row tensor
    ``[|R|, in]`` addressed by R; a column tensor ``[out - |R|, |C|]`` addressed by the other rows
    (None when R is empty) and C.
    """
    out = []
    if n_rows:
        out.append((n_rows, in_features, n_rows, None))
    if n_cols:
        out.append((out_features - n_rows, n_cols, (out_features - n_rows) if n_rows else None, n_cols))
    return out


def keystone_step_bytes(tensors: Iterable[tuple[int, int, int | None, int | None]], frozen_bytes: int = 2,
                        grad_norm_pass: bool = True, index_bytes: int = 8) -> int:
    """Bytes one KeystoneAdamW step must move (a lower bound: every byte read or written once).

    Per keystone element: the fused pass reads grad, m, v and the fp32 master (16 B), writes m, v
    and the master (12 B) and scatters the rounded value into the frozen weight (``frozen_bytes``,
    2 for bf16): 30 B. KeystoneAdamW also reads every gradient once more for its finiteness check /
    global norm (``grad_norm_pass``: 4 B). Each index tensor is read once (``index_bytes`` per index).
    ``tensors``: ``(n, m, row_indices, col_indices)`` as :func:`keystone_tensor_layout` gives.
    A scattered column write moves a whole cache line / DRAM sector in hardware, so a column-heavy
    mask moves more than this; the model counts useful bytes.
    """
    per_elem = 16 + 12 + frozen_bytes + (4 if grad_norm_pass else 0)
    total = 0
    for n, m, r, c in tensors:
        total += n * m * per_elem + index_bytes * ((r or 0) + (c or 0))
    return total


def dense_adamw_bytes(numel: int, masked: bool = False, mask_bytes: int = 1) -> int:
    """Bytes a dense fp32 AdamW step must move over ``numel`` weights (one fused pass, a lower bound).

    Reads weight, grad, m, v (16 B) and writes weight, m, v (12 B): 28 B per element. ``masked``
    adds the paper's gradient masking pass, ``grad *= mask`` (reads grad and a ``mask_bytes`` mask,
    writes grad: 8 + 1 B for a bool mask). torch's foreach AdamW makes several passes and moves more.
    """
    return numel * (28 + ((8 + mask_bytes) if masked else 0))


def wgrad_flops(tokens: int, out_features: int, in_features: int, n_rows: int | None = None, n_cols: int = 0) -> int:
    """FLOPs of the weight gradient of one ``[out, in]`` linear layer over ``tokens`` tokens.

    ``n_rows=None``: the dense ``dW = dY^T X``, ``2 T out in``. Otherwise the keystone gather:
    rows ``dW[R, :] = dY[:, R]^T X`` (``2 T |R| in``) plus columns of the other rows
    ``dW[notR, C] = dY[:, notR]^T X[:, C]`` (``2 T (out - |R|) |C|``).
    """
    if n_rows is None:
        return 2 * tokens * out_features * in_features
    return 2 * tokens * (n_rows * in_features + (out_features - n_rows) * n_cols)


def train_step_flops(shape: Shape, batch: int, seq: int, keystone_params: int | None = None) -> dict[str, int]:
    """GEMM FLOPs of one train step (forward + backward) of ``shape`` on ``batch x seq`` tokens.

    Matrix products only (norms, activations, softmax and the optimizer are left out). With
    ``T = batch * seq``, ``P`` the projection weights, ``V = vocab * hidden`` the lm_head, and
    ``A = 4 batch seq^2 (heads head_dim)`` per layer for ``QK^T`` and ``PV`` (no causal saving):

    - ``forward = 2 T (P + V) + L A``; ``input_grad = 2 T (P + V) + 2 L A`` (the attention backward
      is four products of the forward's size): both sides pay these;
    - ``weight_grad``: dense ``2 T (P + V)`` (every weight trains; a tied lm_head counted once);
      keystone ``2 T keystone_params`` (embeddings and lm_head frozen).

    ``keystone_params=None`` gives the dense step. Returns the parts and ``total``.
    """
    tokens = batch * seq
    weights = shape.projection_params + shape.vocab * shape.hidden
    attn = shape.layers * 4 * batch * seq * seq * shape.heads * shape.dim_head
    fwd = 2 * tokens * weights + attn
    dx = 2 * tokens * weights + 2 * attn
    dw = 2 * tokens * weights if keystone_params is None else 2 * tokens * keystone_params
    return {"forward": fwd, "input_grad": dx, "weight_grad": dw, "total": fwd + dx + dw}


# --------------------------------------------------------------------------- timing and machine


@dataclass
class Timing:
    """Seconds per call: median and quartiles over ``reps`` timed calls after ``warmup`` calls."""

    median: float
    q1: float
    q3: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 1, reps: int = 5,
            min_time_s: float = 0.0, max_reps: int = 200) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``reps`` timed calls and at least
    ``min_time_s`` seconds of them (at most ``max_reps``). CUDA: one pair of events per call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise
    times: list[float] = []
    try:
        spent = 0.0
        while len(times) < reps or (spent < min_time_s and len(times) < max_reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            times.append(t)
            spent += t
    finally:
        if was_enabled:
            gc.enable()
    qs = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), qs[0], qs[2], len(times))


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _git_state() -> tuple[str | None, list[str]]:
    """(HEAD commit, "+dirty" appended when tracked files differ; the differing paths)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, []
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        dirty = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        return head.stdout.strip() + ("+dirty" if dirty else ""), dirty
    except (OSError, subprocess.SubprocessError):
        return None, []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> dict:
    """CPU / GPU model, versions (Python, torch, Triton, Transformers, CUDA), commit, time."""
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(),
    }
    info["commit"], info["modified_files"] = _git_state()
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    return info


def copy_bandwidth(device: str | torch.device, nbytes: int | None = None) -> dict[str, float]:
    """Measured memory bandwidth of the device, bytes/s, from two large streaming fp32 ops.

    ``copy``: ``dst.copy_(src)``, counted as read + write. ``inplace``: ``x.mul_(1)``, read + write
    of the same memory. On a CPU a copy also reads the destination lines before writing them
    (write-allocate), so it shows about 2/3 of what in-place streams reach; an optimizer step
    updates in place. ``limit`` (the larger) is the physical limit quoted beside the results.
    """
    device = torch.device(device)
    nbytes = nbytes or (_GIB if device.type == "cuda" else 256 * 1024**2)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / measure(lambda: dst.copy_(src), device, warmup=2, reps=7).median
    inplace = 2 * nbytes / measure(lambda: src.mul_(1.0), device, warmup=2, reps=7).median
    del src, dst
    return {"copy": copy, "inplace": inplace, "limit": max(copy, inplace)}


def count_launches(fn: Callable[[], object]) -> int | None:
    """Kernels (and memcpy / memset) that one call of ``fn`` runs on the CUDA device (None if unknown)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.profiler.kineto_results.events()
        return sum(1 for e in events if e.device_type() == torch.autograd.DeviceType.CUDA and e.name() != "[memory]")
    except Exception:  # noqa: BLE001 - a profiler problem must not stop the benchmark
        return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start / stop lines) for the duration."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live (profiling.peak_memory)."""
    from .profiling import peak_memory

    if device.type == "cuda":
        return int(peak_memory(fn, device))
    with _quiet_stderr():
        return int(peak_memory(fn, device))


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * _GIB


# --------------------------------------------------------------------------- optimizer step


def _projection_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"


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
    def build(cls, shape: Shape, layers: int, device: str | torch.device, seed: int = 0) -> "OptimizerCase":
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        frozen = {}
        for i in range(layers):
            for name, o, k in shape.projections():
                frozen[_projection_path(i, name)] = (torch.randn(o, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        return cls(shape, layers, device, build_model(shape, layers), frozen)

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.frozen.values())

    def mask(self, fraction: float, seed: int = 0):
        return synthetic_mask(self.meta, fraction, seed)

    def dense(self, fraction: float, seed: int = 0) -> "DenseAdamWSetup":
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

    def keystone(self, fraction: float, backend: str, seed: int = 0) -> "KeystoneSetup":
        """KeystoneLinear modules over the frozen weights (shared, not copied) with random keystone grads."""
        from .linear import KeystoneLinear

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
        return sum(2 * w.numel() * w.element_size() for w in self.weights) + (sum(m.numel() for m in self.masks) if masked else 0)

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
        from .optim import KeystoneAdamW

        return KeystoneAdamW(self.params, lr=1e-5, weight_decay=0.01, backend=backend)


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
        return {"shape": shape.name, "skipped": f"one layer needs {shape.projection_params_per_layer * 26 / _GIB:.1f} GiB "
                f"> budget {budget / _GIB:.1f} GiB"}
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
                peak = _peak(step, device)  # the first step allocates m and v
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
        for backend in backends:
            opt = ks.optimizer(backend)
            peak = _peak(opt.step, device)
            t = measure(opt.step, device, warmup=warmup + 1, reps=max(reps, 5), min_time_s=min_time_s)
            launches = count_launches(opt.step) if device.type == "cuda" else None
            moved = keystone_step_bytes(ks.layout)
            out["keystone"].append({
                "fraction": f, "backend": backend, "neurons": ks.mask.num_neurons, "params": n_params,
                "param_fraction": n_params / numel, "time": t.as_dict(), "memory_bytes": ks.resident_bytes() + peak,
                "bytes_model": moved, "bandwidth": moved / t.median,
                "bandwidth_fraction": moved / t.median / bandwidth if bandwidth else None, "launches": launches,
            })
            log(f"  keystone {100 * f:g}% {backend}: {n_params} params, {t.median * 1e3:.2f} ms")
            del opt
        del ks
    return out


# --------------------------------------------------------------------------- host work of a step

HOST_COUNTS = (24, 384)  # keystone tensors of the two layouts whose step times give the per-tensor slope


def host_layout(tensors: int, backend: str, device: torch.device, seed: int = 0) -> tuple[list, list]:
    """(modules, params): ``tensors`` tiny keystone tensors (rows [2, 8] and columns [14, 2] of [16, 8]
    bf16 weights) with grads; keep the modules alive while stepping the params.

    Kernel time is negligible at these sizes, so a step's time is its host work.
    """
    from .linear import KeystoneLinear

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
    from .optim import KeystoneAdamW

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


# --------------------------------------------------------------------------- weight gradient

# A weight-gradient variant timed beside the Triton kernel (GPU): gather dY's keystone columns with
# index_select, then one cuBLAS GEMM in the activations' dtype (fp32 accumulation), cast to fp32.
WGRAD_MM = "index_select+mm"


def _index_select_mm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
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
    def build(cls, shape: Shape, tokens: int, device: str | torch.device, seed: int = 0) -> "WgradCase":
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
        from . import ops

        if backend == WGRAD_MM:
            gather = _index_select_mm
        else:
            def gather(dy, x, rows):
                return ops.gather_wgrad(dy, x, rows, None, backend=backend)

        indices = layer_mask(self.meta, fraction, 0, seed).weight_indices(self.meta)
        work, flops, params = [], 0, 0
        for n, o, i in self.shape.projections():
            ind = indices.get(_projection_path(0, n))
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
    timed, :data:`WGRAD_MM` (index_select + torch.mm) is timed beside it.
    """
    case = WgradCase.build(shape, tokens, device, seed)
    dense = case.dense_fn()
    peak = _peak(dense, device)
    t = measure(dense, device, warmup=warmup, reps=reps, min_time_s=min_time_s)
    flops = case.dense_flops
    out = {"shape": shape.name, "tokens": tokens, "dtype": str(case.dtype).replace("torch.", ""), "device": device.type,
           "dense": {"time": t.as_dict(), "flops": flops, "flops_per_s": flops / t.median, "memory_bytes": peak},
           "keystone": []}
    log(f"weight grad: {shape.name} layer 0, {tokens} tokens: dense {t.median * 1e3:.1f} ms")
    variants = list(backends) + ([WGRAD_MM] if "triton" in backends else [])
    for f in fractions:
        for backend in variants:
            fn, params, kflops = case.keystone_fn(f, backend, seed)
            kpeak = _peak(fn, device)
            kt = measure(fn, device, warmup=warmup + 1, reps=max(reps, 5), min_time_s=min_time_s)
            out["keystone"].append({"fraction": f, "backend": backend, "params": params, "flops": kflops,
                                    "time": kt.as_dict(), "flops_per_s": kflops / kt.median, "memory_bytes": kpeak})
            log(f"  keystone {100 * f:g}% {backend}: {kt.median * 1e3:.2f} ms")
    return out


# --------------------------------------------------------------------------- train step (subprocess)


@dataclass
class TrainSpec:
    """One side of a train-step comparison, run by :func:`train_worker` in a fresh process."""

    shape: str
    side: str  # "dense" or "keystone"
    device: str = "cpu"
    batch: int = 4
    seq: int = 128
    fraction: float = 1e-3
    backend: str = "auto"
    warmup: int = 1
    reps: int = 2
    seed: int = 0


def _proc_status(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    (embeddings / norms back to fp32 on CPU, where KeystoneLinear computes in fp32; bf16
    activations on CUDA), KeystoneAdamW. Same random tokens (``labels = input_ids``) on both sides.
    """
    from .optim import KeystoneAdamW
    from .patching import keystone_parameters, patch

    device = torch.device(spec.device)
    shape = SHAPES[spec.shape]
    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, shape.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    info: dict = {"spec": asdict(spec)}
    if spec.side == "dense":
        model = build_model(shape, device=device, dtype=torch.float32, seed=spec.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **kw)
        info.update(optimizer=f"torch AdamW({next(iter(kw))})")
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    elif spec.side == "keystone":
        model = build_model(shape, device=device, dtype=torch.bfloat16, seed=spec.seed)
        mask = synthetic_mask(model, spec.fraction, spec.seed)
        patch(model, mask, frozen_dtype=torch.bfloat16, backend=spec.backend,
              other_dtype=torch.float32 if device.type == "cpu" else None)
        params = keystone_parameters(model)
        opt = KeystoneAdamW(params, lr=1e-5, weight_decay=0.01, backend=spec.backend)
        info.update(neurons=mask.num_neurons, backend=model._keystone.backend, optimizer="KeystoneAdamW")
        autocast = contextlib.nullcontext
    else:
        raise ValueError(f"side must be 'dense' or 'keystone', got {spec.side!r}")
    model.train()
    info["trainable"] = sum(p.numel() for p in params)

    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, info


def train_worker(spec: TrainSpec) -> dict:
    """Build one side of a train step, time it and measure its peak memory (meant for a fresh process).

    Memory: CPU RSS right after imports (torch, Transformers, this package, the extension loaded on
    both sides), after setup, and its peaks (VmHWM over the whole process, and over the training
    alone after a reset where Linux allows); CUDA: bytes allocated after setup and the peak during
    the training steps (``max_memory_allocated``). Not ``ru_maxrss``: Linux carries it over from
    the parent through fork + exec, so a worker started by a large parent reports the parent's peak.
    """
    from . import ops

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
    t = measure(step, device, warmup=spec.warmup, reps=spec.reps)
    tokens = spec.batch * spec.seq
    hwm = _proc_status("VmHWM")
    info.update(time=t.as_dict(), tokens=tokens, tokens_per_s=tokens / t.median,
                rss_after_imports=rss_imports, rss_after_setup=rss_setup, peak_rss_setup=hwm_setup,
                peak_rss=max(hwm or 0, hwm_setup or 0), peak_rss_train=hwm if reset else None, loadavg=loadavg())
    if device.type == "cuda":
        info.update(memory_allocated_setup=alloc_setup, peak_allocated=torch.cuda.max_memory_allocated(device))
    return info


def _worker_main(arg: str) -> None:
    spec = TrainSpec(**json.loads(arg))
    result = train_worker(spec)
    print(_RESULT_TAG + json.dumps(result), flush=True)


def run_train_subprocess(spec: TrainSpec, timeout: float = 1800) -> dict:
    """Run :func:`train_worker` in a fresh Python process and return its result dict."""
    env = dict(os.environ)
    code = "import sys; from keystone_kernels.bench import _worker_main; _worker_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(spec))], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    raise RuntimeError(f"train-step worker ({spec.side}, {spec.shape}) failed with exit code {proc.returncode}:\n{tail}")


def _train_memory(r: dict, device: str) -> int:
    """The memory a train step needs: CUDA peak allocated; CPU peak RSS above the RSS right after imports."""
    if device == "cuda":
        return int(r["peak_allocated"])
    return int(r["peak_rss"] - r["rss_after_imports"])


def bench_train(shape: Shape, device: torch.device, batch: int, seq: int, cases: Sequence[tuple[float, str]],
                *, warmup: int = 1, reps: int = 2, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Full train step: dense full fine-tuning vs keystone ``(fraction, backend)`` cases, one process each."""
    out = {"shape": shape.name, "device": device.type, "batch": batch, "seq": seq, "keystone": []}
    common = dict(shape=shape.name, device=device.type, batch=batch, seq=seq, warmup=warmup, reps=reps, seed=seed)
    dense = run_train_subprocess(TrainSpec(side="dense", **common))
    dense["memory_bytes"] = _train_memory(dense, device.type)
    dense["flops"] = train_step_flops(shape, batch, seq)
    out["dense"] = dense
    log(f"train step: {shape.name}, batch {batch} x seq {seq}: dense {dense['time']['median']:.3f} s/step, "
        f"{dense['memory_bytes'] / _GIB:.2f} GiB")
    for fraction, backend in cases:
        r = run_train_subprocess(TrainSpec(side="keystone", fraction=fraction, backend=backend, **common))
        r["memory_bytes"] = _train_memory(r, device.type)
        r["flops"] = train_step_flops(shape, batch, seq, r["trainable"])
        r["fraction"], r["backend_requested"] = fraction, backend
        out["keystone"].append(r)
        log(f"  keystone {100 * fraction:g}% {r['backend']}: {r['time']['median']:.3f} s/step, "
            f"{r['memory_bytes'] / _GIB:.2f} GiB")
    return out


# --------------------------------------------------------------------------- plan, report


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
    budget: int = 6 * _GIB
    parts: tuple[str, ...] = ("host", "optimizer", "wgrad", "train")
    default_backend: str | None = None  # what backend="auto" picks on the device, quoted by the targets
    notes: list[str] = field(default_factory=list)


def bench_backends(device: torch.device) -> list[str]:
    """Backends worth timing on ``device``: Triton on CPU only runs under its interpreter (not a speed)."""
    from . import ops

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
                     ("llama-3.2-1b", 1, 512, [(f, auto) for f in fr] + [(1e-3, b) for b in bk if b not in (auto, "reference")]),
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
        train = [t for t in train if t[0] in shapes] or [(s, 4, 128 if not cuda else 512, [(1e-3, auto)]) for s in shapes[:1]]
    train = [(s, b, q, [(f, k) for f, k in cases if f in fr and k in bk]) for s, b, q, cases in train]
    train = [t for t in train if t[3]]
    total = _free_device_bytes(device)
    budget = int(budget_gb * _GIB) if budget_gb else int(min(6 * _GIB, 0.4 * total) if not cuda else 0.4 * total)
    known_parts = ("host", "optimizer", "wgrad", "train")
    parts = tuple(parts or known_parts)
    if set(parts) - set(known_parts):
        raise ValueError(f"unknown parts {sorted(set(parts) - set(known_parts))}; known: {', '.join(known_parts)}")
    return Plan(device, quick, fr, bk, opt_shapes, wg_shapes, 512 if not cuda else 8192, train,
                # a dense train step on the CPU settles only after a few steps (the allocator's heap grows
                # to its working set; until then large buffers are mapped and faulted in afresh)
                warmup=1, reps=3 if quick else 5, train_warmup=2 if quick else 3, train_reps=3 if quick else 5,
                budget=budget, parts=parts, default_backend=auto)


def _train_fits(shape: Shape, batch: int, seq: int, device: torch.device) -> tuple[bool, str]:
    """Dense full fine-tuning needs ~16 B per parameter plus activations; skip what cannot fit."""
    need = 16 * shape.total_params + 4 * batch * seq * (shape.vocab * 3 + shape.layers * 16 * shape.hidden)
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else _free_device_bytes(device)
    ok = need < 0.85 * have
    return ok, f"dense needs ~{need / _GIB:.0f} GiB, {have / _GIB:.0f} GiB {'total' if device.type == 'cuda' else 'available'}"


def summarize(results: dict) -> dict:
    """Ratios per case, and the docs/design.md section 8 targets that this run measured."""
    device = results["config"]["device"]
    rows: dict[str, list[dict]] = {"optimizer": [], "wgrad": [], "train": []}
    for o in results.get("optimizer", []):
        if o.get("skipped"):
            continue
        for k in o["keystone"]:
            t = k["time"]["median"]
            r = {"shape": o["shape"], "fraction": k["fraction"], "backend": k["backend"], "time_s": t,
                 "params": k["params"], "bandwidth_fraction": k["bandwidth_fraction"], "launches": k["launches"]}
            for name, d in o["dense"].items():
                r[f"speedup_vs_{name}"] = d["time"]["median"] / t
                r[f"memory_ratio_vs_{name}"] = k["memory_bytes"] / d["memory_bytes"]
            rows["optimizer"].append(r)
    for w in results.get("wgrad", []):
        for k in w["keystone"]:
            rows["wgrad"].append({"shape": w["shape"], "fraction": k["fraction"], "backend": k["backend"],
                                  "time_s": k["time"]["median"], "speedup": w["dense"]["time"]["median"] / k["time"]["median"],
                                  "flop_ratio": w["dense"]["flops"] / max(k["flops"], 1),
                                  "memory_ratio": k["memory_bytes"] / max(w["dense"]["memory_bytes"], 1)})
    for tr in results.get("train", []):
        d = tr["dense"]
        for k in tr["keystone"]:
            r = {"shape": tr["shape"], "batch": tr["batch"], "seq": tr["seq"], "fraction": k["fraction"],
                 "backend": k["backend"], "time_s": k["time"]["median"], "tokens_per_s": k["tokens_per_s"],
                 "dense_tokens_per_s": d["tokens_per_s"], "speedup": d["time"]["median"] / k["time"]["median"],
                 "flop_bound": d["flops"]["total"] / k["flops"]["total"],
                 "memory_ratio": k["memory_bytes"] / d["memory_bytes"]}
            if device == "cpu":
                r["memory_ratio_absolute_rss"] = k["peak_rss"] / d["peak_rss"]
            rows["train"].append(r)

    def find(kind, **want):
        return [r for r in rows[kind] if all((abs(r[k] - v) < 1e-12 if isinstance(v, float) else r[k] == v) for k, v in want.items())]

    default_backend = results["config"].get("default_backend")

    def best(kind, key, **want):
        """The row a target quotes: the default backend's (what ``backend="auto"`` picks) when measured,
        else the best backend's."""
        found = [r for r in find(kind, **want) if r.get(key) is not None]
        preferred = [r for r in found if r["backend"] == default_backend]
        return max(preferred or found, key=lambda r: r[key]) if found else None

    targets = []

    def target(name, row, key, goal, higher=True, why=""):
        if row is None:
            return
        v = row[key]
        holds = v >= goal if higher else v <= goal
        targets.append({"target": name, "value": v, "goal": f"{'>=' if higher else '<='} {goal:g}", "holds": holds,
                        "backend": row.get("backend"), "note": why})

    for h in results.get("host", []):
        for r in h["rows"]:
            if r["backend"] == ("ext" if device == "cpu" else default_backend) and not r["capturable"]:
                target(f"host work per extra keystone tensor in one step ({h['counts'][0]} vs {h['counts'][-1]} tiny "
                       "tensors), us", dict(r, slope_us=r["slope_s"] * 1e6), "slope_us", 2.0, higher=False)
    if device == "cpu":
        target("optimizer step, 0.1%, SmolLM2-135M, vs torch AdamW (foreach), no masking",
               best("optimizer", "speedup_vs_foreach", shape="smollm2-135m", fraction=1e-3),
               "speedup_vs_foreach", 500)
        tr = (best("train", "speedup", shape="smollm2-135m", fraction=1e-3, batch=4, seq=128)
              or best("train", "speedup", shape="smollm2-135m", fraction=1e-3))
        where = f"{tr['batch']} x {tr['seq']}, " if tr else ""
        target(f"full train step, SmolLM2-135M, {where}0.1%, vs dense AdamW", tr, "speedup", 1.2)
        target(f"peak RSS above imports, SmolLM2-135M train step, {where}0.1%", tr, "memory_ratio", 0.5, higher=False)
    else:
        target("optimizer step, 0.1%, Llama-3.1-8B, vs torch AdamW(fused) with masked gradients",
               best("optimizer", "speedup_vs_masked_fused", shape="llama-3.1-8b", fraction=1e-3),
               "speedup_vs_masked_fused", 200)
        target("optimizer step, 1%, Llama-3.1-8B, achieved / measured bandwidth",
               best("optimizer", "bandwidth_fraction", shape="llama-3.1-8b", fraction=1e-2), "bandwidth_fraction", 0.6)
        target("weight grad, 1%, Llama-3.1-8B layer, vs dense dW GEMM",
               best("wgrad", "speedup", shape="llama-3.1-8b", fraction=1e-2), "speedup", 10)
        tr = best("train", "speedup", shape="llama-3.2-1b", seq=2048, batch=4, fraction=1e-3)
        target("full train step, Llama-3.2-1B, 4 x 2048, 0.1%, vs dense AdamW", tr, "speedup", 1.5)
        target("peak memory ratio, Llama-3.2-1B, 4 x 2048, 0.1%", tr, "memory_ratio", 0.3, higher=False)
        target("full train step, Llama-3.2-1B, 1 x 512, 0.1%, vs dense AdamW",
               best("train", "speedup", shape="llama-3.2-1b", seq=512, batch=1, fraction=1e-3), "speedup", 3)
    return {"rows": rows, "targets": targets}


def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool) -> str:
    if not markdown:
        from .verify import format_table

        return format_table(headers, rows)
    cells = [[str(c) for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def report(results: dict, markdown: bool = False) -> str:
    """The tables of ratios and the targets, as plain text (or markdown)."""
    s = results["summary"]
    lines = []
    m = results["machine"]
    cfg = results["config"]

    def title(text):
        lines.append(f"\n**{text}**\n" if markdown else f"\n{text}")

    lines.append(f"machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs) | torch {m['torch']} | triton {m.get('triton')} "
                 f"| cuda {m['cuda']} | commit {m['commit']} | load average {cfg.get('loadavg_start')} -> {cfg.get('loadavg_end')}")
    for h in results.get("host", []):
        title(f"host work of one KeystoneAdamW step over tiny tensors ({h['device']}): the time per extra tensor")
        lo, hi = h["counts"][0], h["counts"][-1]
        lines.append(_table(["backend", "capturable", f"us at {lo}", f"us at {hi}", "us per extra tensor"],
                            [[r["backend"], "yes" if r["capturable"] else "no", _fmt(r["times"][str(lo)]["median"] * 1e6),
                              _fmt(r["times"][str(hi)]["median"] * 1e6), _fmt(r["slope_s"] * 1e6)]
                             for r in h["rows"]], markdown))
    for o in results.get("optimizer", []):
        if o.get("skipped"):
            title(f"optimizer step, {o['shape']}: skipped ({o['skipped']})")
            continue
        dense = ", ".join(f"{n} {d['time']['median'] * 1e3:.0f} ms" for n, d in o["dense"].items())
        title(f"optimizer step, {o['shape']} shapes, {o['layers']} of {o['of_layers']} layers, "
              f"{o['weights'] / 1e6:.1f}M projection weights; torch AdamW: {dense}")
        rows = [r for r in s["rows"]["optimizer"] if r["shape"] == o["shape"]]
        names = list(o["dense"])
        mem_key = "masked_foreach" if "masked_foreach" in names else names[0]
        lines.append(_table(
            ["keystone", "params", "backend", "ms", *[f"x {n}" for n in names], f"mem / {mem_key}", "bytes/s / limit", "launches"],
            [[_pct(r["fraction"]), r["params"], r["backend"], _fmt(r["time_s"] * 1e3),
              *[_fmt(r[f"speedup_vs_{n}"], ".4g") for n in names], _fmt(r[f"memory_ratio_vs_{mem_key}"]),
              _fmt(r["bandwidth_fraction"], ".1%"), _fmt(r["launches"], "d")] for r in rows], markdown))
    for w in results.get("wgrad", []):
        d = w["dense"]
        title(f"weight gradient, {w['shape']} shapes, the 7 projections of one layer, {w['tokens']} tokens {w['dtype']}: "
              f"dense dW {d['time']['median'] * 1e3:.1f} ms ({d['flops_per_s'] / 1e9:.0f} GFLOP/s)")
        rows = [r for r in s["rows"]["wgrad"] if r["shape"] == w["shape"]]
        ks = {(k["fraction"], k["backend"]): k for k in w["keystone"]}
        lines.append(_table(["keystone", "params", "backend", "ms", "speedup", "FLOP ratio", "GFLOP/s", "mem ratio"],
                            [[_pct(r["fraction"]), ks[(r["fraction"], r["backend"])]["params"], r["backend"],
                              _fmt(r["time_s"] * 1e3), _fmt(r["speedup"], ".4g"), _fmt(r["flop_ratio"], ".4g"),
                              _fmt(ks[(r["fraction"], r["backend"])]["flops_per_s"] / 1e9), _fmt(r["memory_ratio"])]
                             for r in rows], markdown))
    for tr in results.get("train", []):
        d = tr["dense"]
        cpu = tr["device"] == "cpu"
        mem = "peak RSS above the RSS after imports" if cpu else "peak allocated"
        title(f"train step (forward + backward + optimizer), {tr['shape']} shapes, batch {tr['batch']} x seq {tr['seq']}: "
              f"dense ({d['optimizer']}) {d['time']['median']:.3f} s/step, {d['tokens_per_s']:.0f} tokens/s, "
              f"{mem} {d['memory_bytes'] / _GIB:.2f} GiB" + (f" (absolute peak RSS {d['peak_rss'] / _GIB:.2f} GiB)" if cpu else ""))
        rows = [r for r in s["rows"]["train"] if r["shape"] == tr["shape"] and r["seq"] == tr["seq"] and r["batch"] == tr["batch"]]
        ks = {(k["fraction"], k["backend"]): k for k in tr["keystone"]}
        lines.append(_table(
            ["keystone", "params", "backend", "s/step", "tokens/s", "speedup", "FLOP bound", "memory GiB", "mem ratio"]
            + (["abs RSS ratio"] if cpu else []),
            [[_pct(r["fraction"]), ks[(r["fraction"], r["backend"])]["trainable"], r["backend"], _fmt(r["time_s"]),
              _fmt(r["tokens_per_s"], ".0f"), _fmt(r["speedup"]), _fmt(r["flop_bound"]),
              _fmt(ks[(r["fraction"], r["backend"])]["memory_bytes"] / _GIB), _fmt(r["memory_ratio"])]
             + ([_fmt(r["memory_ratio_absolute_rss"])] if cpu else []) for r in rows], markdown))
    if s["targets"]:
        title("targets (docs/design.md section 8)")
        lines.append(_table(["target", "backend", "measured", "goal", "holds"],
                            [[t["target"], t["backend"], _fmt(t["value"], ".3g"), t["goal"], "yes" if t["holds"] else "NO"]
                             for t in s["targets"]], markdown))
    return "\n".join(lines)


def plot(results: dict, path: str | os.PathLike) -> bool:
    """Speedup and memory ratio vs keystone fraction, one line per (benchmark, backend), one row per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["summary"]["rows"]
    shapes = sorted({r["shape"] for kind in rows.values() for r in kind}, key=list(SHAPES).index)
    if not shapes:
        return False
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.6 * len(shapes)), squeeze=False)
    styles = {"optimizer": ("o", "-"), "wgrad": ("s", "--"), "train": ("^", ":")}
    colors = {"ext": "tab:orange", "triton": "tab:green", "reference": "tab:blue"}
    for i, shape in enumerate(shapes):
        ax_s, ax_m = axes[i]
        for kind, (marker, ls) in styles.items():
            sel = [r for r in rows[kind] if r["shape"] == shape]
            groups: dict[tuple, list] = {}
            for r in sel:
                groups.setdefault((r["backend"], r.get("batch"), r.get("seq")), []).append(r)
            for (backend, batch, seq), rs in groups.items():
                rs.sort(key=lambda r: r["fraction"])
                xs = [r["fraction"] * 100 for r in rs]
                label = {"optimizer": "optimizer vs masked AdamW", "wgrad": "weight grad vs dense dW",
                         "train": f"train step {batch}x{seq}"}[kind] + f" [{backend}]"
                key = "speedup_vs_masked_foreach" if kind == "optimizer" else "speedup"
                mkey = "memory_ratio_vs_masked_foreach" if kind == "optimizer" else "memory_ratio"
                if kind == "optimizer" and key not in rs[0]:
                    key = next(k for k in rs[0] if k.startswith("speedup_vs_"))
                    mkey = "memory_ratio_vs_" + key[len("speedup_vs_"):]
                color = colors.get(backend)
                ax_s.plot(xs, [r[key] for r in rs], marker=marker, linestyle=ls, color=color, label=label)
                ax_m.plot(xs, [r[mkey] for r in rs], marker=marker, linestyle=ls, color=color, label=label)
        for ax, title, ylabel in ((ax_s, "speedup over dense (x)", "speedup"), (ax_m, "memory keystone / dense", "ratio")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("keystone neurons (%)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} ({results['config']['device']}): {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_s.axhline(1.0, color="grey", lw=0.8)
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(plan: Plan, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict:
    """Run ``plan``; write ``bench_<device>[_quick].json`` (after every part), ``.md`` (the tables) and
    ``.png`` (the plot) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = plan.device
    stem = f"bench_{device.type}{'_quick' if plan.quick else ''}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    bw = copy_bandwidth(device)
    bandwidth = bw["limit"]
    results: dict = {
        "machine": machine_info(device),
        "config": {"device": device.type, "quick": plan.quick, "fractions": list(plan.fractions), "backends": list(plan.backends),
                   "default_backend": plan.default_backend,
                   "warmup": plan.warmup, "reps": plan.reps, "train_warmup": plan.train_warmup, "train_reps": plan.train_reps,
                   "budget_bytes": plan.budget,
                   "bandwidth": bw, "loadavg_start": loadavg(), "notes": plan.notes,
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
            results["optimizer"].append(bench_optimizer(SHAPES[name], plan.fractions, plan.backends, device, warmup=plan.warmup,
                                                        reps=plan.reps, budget=plan.budget, bandwidth=bandwidth, log=log))
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
        for name, batch, seq, cases in plan.train:
            ok, why = _train_fits(SHAPES[name], batch, seq, device)
            if not ok:
                log(f"train step {name} {batch}x{seq}: skipped ({why})")
                results["config"]["notes"].append(f"train step {name} {batch}x{seq} skipped: {why}")
                continue
            try:
                results["train"].append(bench_train(SHAPES[name], device, batch, seq, cases, warmup=plan.train_warmup,
                                                    reps=plan.train_reps, log=log))
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
    return results


# --------------------------------------------------------------------------- CLI


def _parse_fractions(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        if not 0 < value <= 1:
            raise ValueError(f"keystone fraction {part!r} must be in (0, 1] (or a percentage like 0.1%)")
        out.append(float(f"{value:.10g}"))  # 0.1% -> exactly 1e-3, so that it matches the default cases
    return out


def _parse_train_steps(text: str, plan: Plan) -> list[tuple[str, int, int, list[tuple[float, str]]]]:
    """``SHAPE:BATCHxSEQ[,...]`` as ``Plan.train`` entries, one case each: 0.1% (else the plan's first
    fraction) with the default backend. Lets a short GPU check time one train step of a shape that
    the other parts do not use (``--shapes`` names the shapes of every part)."""
    fraction = 1e-3 if 1e-3 in plan.fractions else plan.fractions[0]
    steps = []
    for part in text.split(","):
        name, _, size = part.strip().partition(":")
        batch, _, seq = size.lower().partition("x")
        if name not in SHAPES or not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
            raise ValueError(f"--train-steps {part.strip()!r}: expected SHAPE:BATCHxSEQ, e.g. llama-3.2-1b:1x512, "
                             f"with SHAPE one of {', '.join(SHAPES)}")
        steps.append((name, int(batch), int(seq), [(fraction, plan.default_backend)]))
    return steps


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
    return results


def cmd_bench(args) -> int:
    if args.report:
        results = rerender(args.report)
        print(report(results))
        print(f"\nwrote {', '.join(results['files'].values())}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    plan = make_plan(device, args.quick, backends=args.backends.split(",") if args.backends else None,
                     shapes=args.shapes.split(",") if args.shapes else None,
                     fractions=_parse_fractions(args.fractions) if args.fractions else None,
                     parts=args.parts.split(",") if args.parts else None, budget_gb=args.mem_budget_gb)
    if args.train_steps:
        plan.train = _parse_train_steps(args.train_steps, plan)
    available = bench_backends(device)
    missing = [b for b in plan.backends if b not in available]
    if missing:
        raise RuntimeError(f"backends {missing} cannot run on {device.type} here (available: {', '.join(available) or 'none'})")
    start = time.perf_counter()
    results = run(plan, args.out)
    print()
    print(report(results))
    print(f"\nwrote {', '.join(results['files'].values())} in {time.perf_counter() - start:.0f} s")
    return 0


def add_bench_command(sub) -> None:
    """Register ``keystone-kernels bench`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="speed and memory against dense AdamW, as ratios (JSON + plot)",
                       description="Optimizer step, weight gradient and full train step of keystone training against "
                                   "dense torch AdamW on real model shapes (random weights), with peak memory.")
    p.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only, few repetitions (minutes on a CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON and the plot (default ./bench-out)")
    p.add_argument("--backends", help="comma-separated keystone backends (default: every one that runs on the device)")
    p.add_argument("--shapes", help=f"comma-separated model shapes (default: quick or full set; known: {', '.join(SHAPES)})")
    p.add_argument("--fractions", help="comma-separated keystone fractions of neurons, e.g. 0.1%%,1%% (default 0.01%%,0.1%%,1%%,5%%)")
    p.add_argument("--parts", help="comma-separated subset of host,optimizer,wgrad,train (default all)")
    p.add_argument("--train-steps", metavar="SHAPE:BxS[,...]",
                   help="train steps to run instead of the default ones, e.g. llama-3.2-1b:1x512 (each one row: "
                        "0.1%% or else the first of --fractions, with the default backend); independent of --shapes")
    p.add_argument("--report", metavar="JSON", help="measure nothing: recompute the summary of a results JSON and "
                                                     "rewrite its tables (.md) and plot (.png) beside it")
    p.add_argument("--mem-budget-gb", type=float, help="memory the optimizer benchmark may use (default: CPU min(6, 40%% of "
                                                      "available) GiB, CUDA 40%% of free)")
    p.set_defaults(func=cmd_bench)

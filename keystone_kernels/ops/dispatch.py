"""Backend choice and the public op functions.

``backend`` is one of ``"reference"``, ``"triton"``, ``"ext"`` or ``"auto"``. ``None`` means the
environment variable ``KEYSTONE_BACKEND`` if set, else ``"auto"``: Triton for CUDA tensors when
Triton imports, else the C++ extension when it loads (or builds), else the plain PyTorch
reference. On CUDA, ``"auto"`` routes an op whose kernel the GPU bench measured slower than the
reference to the reference instead (:data:`AUTO_CUDA_OPS`). An explicit backend that cannot run on
the given device raises RuntimeError.

The public functions validate their inputs once, here (with :mod:`keystone_kernels.ops.checks`);
the backends then assume valid inputs.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from . import ext, reference
from .checks import FLOAT_DTYPES, check_index, check_target, check_tensor
from .layout import SCALARS, FlatLayout

__all__ = [
    "AUTO_CUDA_OPS",
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "gather_wgrad",
    "scatter_to_frozen",
    "fused_adamw_scatter",
]

BACKENDS = ("reference", "triton", "ext")
_ENV = "KEYSTONE_BACKEND"

# Ops that "auto" runs on the reference backend on CUDA, because the GPU bench measured it faster there
# (docs/design.md, "Which backend auto picks"). gather_wgrad: on the H200 (bench/results/gpu_check_h200),
# one Llama-3.1-8B layer, 8192 tokens, index_select + torch.mm was 8.2x the dense dW GEMM at 1% and 9.6x
# at 0.1%, against Triton's 5.1x and 2.7x; its host time per call is a few us, Triton's about 48 us.
# Remove an entry when a kernel beats the reference in that bench.
AUTO_CUDA_OPS = {"gather_wgrad": "reference"}


# --------------------------------------------------------------------------- backend choice


_triton_import: list[ModuleType | None] = []  # [] until tried, then [module or None]


def _triton_module() -> ModuleType | None:
    if not _triton_import:
        try:
            _triton_import.append(importlib.import_module("keystone_kernels.ops.triton"))
        except ImportError:
            _triton_import.append(None)
    return _triton_import[0]


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    if device.type not in ("cuda", "cpu"):
        return False, f"Triton kernels do not run on {device.type} tensors"
    if _triton_module() is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return (torch.cuda.is_available(), "CUDA is not available")
    from .triton._common import interpreting

    return interpreting(), "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (for tests)"


def _ext_usable(device: torch.device) -> tuple[bool, str]:
    if device.type not in ("cuda", "cpu"):
        return False, f"the C++ extension has no kernels for {device.type} tensors"
    try:
        ext.load()
    except ext.ExtensionUnavailable as err:
        return False, str(err)
    if device.type == "cuda" and not ext.has_cuda():
        return False, "the C++ extension was built without CUDA kernels"
    return True, ""


def _usable(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name == "triton":
        return _triton_usable(device)
    return _ext_usable(device)


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` here (default: cuda when available, else cpu).

    May build the C++ extension (once, cached) to find out whether it works.
    """
    dev = _as_device(device)
    return [name for name in BACKENDS if _usable(name, dev)[0]]


_warned_fallback = False


def resolve_backend(name: str | None = None, device: torch.device | str | None = None, op: str | None = None) -> str:
    """The backend that will run ops (or the op named ``op``, e.g. "gather_wgrad") for tensors on ``device``.

    name: "auto", "reference", "triton", "ext", or None for $KEYSTONE_BACKEND (default "auto").
    Raises ValueError for an unknown name and RuntimeError when an explicitly named backend
    cannot run on ``device``.
    """
    global _warned_fallback
    source = "backend argument"
    if name is None:
        name, source = os.environ.get(_ENV) or "auto", f"${_ENV}"
    if not isinstance(name, str) or name.strip().lower() not in ("auto",) + BACKENDS:
        raise ValueError(f"{name!r} ({source}) is not a keystone backend; valid: {', '.join(('auto',) + BACKENDS)}")
    name = name.strip().lower()
    dev = _as_device(device)
    if name != "auto":
        ok, why = _usable(name, dev)
        if not ok:
            raise RuntimeError(f"keystone backend {name!r} ({source}) cannot run on {dev.type} tensors: {why}")
        return name
    if dev.type == "cuda" and op in AUTO_CUDA_OPS:
        return AUTO_CUDA_OPS[op]
    if dev.type == "cuda" and _triton_usable(dev)[0]:
        return "triton"
    ok, why = _ext_usable(dev)
    if ok:
        return "ext"
    if not _warned_fallback:
        warnings.warn(f"keystone: using the slow reference backend ({why})", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return "reference"


def _backend_module(name: str) -> ModuleType:
    if name == "reference":
        return reference
    if name == "triton":
        return _triton_module()
    return ext


# (backend argument, device type, $KEYSTONE_BACKEND, op) -> backend module. A plain dict lookup, so that
# the hot path (every op call, and torch.compile tracing it) resolves a backend once per process.
_routes: dict[tuple[str | None, str, str | None, str | None], ModuleType] = {}


def _resolve_route(backend: str | None, device_type: str, env: str | None, op: str | None) -> str:
    """The backend name for a route, importing its module. torch.compile runs this eagerly and takes
    its result as a constant, so that a first op call inside a compiled region (which may import
    Triton, build the extension or warn) does not break the graph. ``env`` is only part of the key."""
    name = resolve_backend(backend, device_type, op)
    _backend_module(name)
    return name


# What torch.compiler.assume_constant_result does (it sets this attribute and returns the function),
# written out: the decorator imports torch._dynamo, which costs 2-3 s at every process start
# (each torchrun rank, each benchmark worker). tests/test_compile.py checks the effect.
_resolve_route._dynamo_marked_constant = True


def _route(backend: str | None, device: torch.device, op: str | None = None) -> ModuleType:
    key = (backend, device.type, os.environ.get(_ENV), op)
    module = _routes.get(key)
    if module is None:
        module = _backend_module(_resolve_route(*key))
        if not torch.compiler.is_compiling():  # a write while tracing (e.g. in a backward) would break the graph
            _routes[key] = module
    return module


# --------------------------------------------------------------------------- public ops


def gather_wgrad(
    grad_out: Tensor,
    x: Tensor,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Weight gradient of the keystone sub-matrix: ``grad_out[:, rows]^T @ x[:, cols]`` in fp32.

    grad_out: [T, out] and x: [T, in], same dtype (float32, bfloat16 or float16), same device.
    rows: int64 [n] indices into out, or None for all; cols: int64 [m] into in, or None for all.
    Returns float32 [n (or out), m (or in)], accumulated in fp32; zeros when T == 0. No backend
    allocates an fp32 temporary larger than twice the result (so none of size [out, in] unless the
    result is at least half of it).
    """
    check_tensor("grad_out", grad_out, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("x", x, dim=2, dtypes=(grad_out.dtype,), device=grad_out.device)
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"grad_out [T, out] and x [T, in] must have the same T, got {tuple(grad_out.shape)} and {tuple(x.shape)}"
        )
    check_index("rows", rows, grad_out.shape[1], grad_out.device, unique=False)
    check_index("cols", cols, x.shape[1], grad_out.device, unique=False)
    return _route(backend, grad_out.device, "gather_wgrad").gather_wgrad(grad_out, x, rows, cols)


def gather_wgrad_unchecked(grad_out: Tensor, x: Tensor, rows: Tensor | None, cols: Tensor | None, *,
                           backend: str | None = None) -> Tensor:
    """:func:`gather_wgrad` without its argument checks (five tensor and index checks, whose host time per
    call bench/host_overhead.py measures: bench/results/host_overhead_cpu).

    For KeystoneLinear's backward, whose operands are consistent by construction (one dtype, one
    device, ``T`` shared) and whose indices were validated when the layer was built or moved. An
    index out of range here is an out-of-bounds access, not an error; everyone else calls
    :func:`gather_wgrad`.
    """
    return _route(backend, grad_out.device, "gather_wgrad").gather_wgrad(grad_out, x, rows, cols)


def linear_autograd(backend: str | None, device: torch.device):
    """The backend's C++ autograd op for KeystoneLinear's forward and backward on ``device``
    (``torch.ops.keystone.linear``: no Python in the backward) when ``backend`` routes to the extension,
    else None: KeystoneLinear then runs its Python ``autograd.Function``, which is also what
    torch.compile traces. Its arguments are the Function's (see nn/linear.py)."""
    module = _route(backend, device)
    return module.linear_op() if module is ext else None


def scatter_to_frozen(
    weight: Tensor,
    src: Tensor,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """In place: ``weight[rows[i], cols[j]] = src[i, j]``, rounded to nearest even into weight's dtype.

    weight: [out, in] float32 / bfloat16 / float16 (any strides); src: float32 [n (or out), m (or in)].
    rows / cols: sorted unique int64 indices, or None for all. Every other element of weight is
    left bit-identical.
    """
    check_tensor("src", src, dim=2, dtypes=(torch.float32,), device=getattr(weight, "device", None))
    check_target(weight, rows, cols, tuple(src.shape))
    _route(backend, weight.device).scatter_to_frozen(weight, src, rows, cols)


def fused_adamw_scatter(
    layout: FlatLayout,
    master: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    *,
    scalars: tuple[float, float, float, float] | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    backend: str | None = None,
) -> None:
    """One AdamW step over flat arenas, then every tensor's new values scattered into its frozen weight.

    Elementwise over the arenas, the math of ``torch.optim.AdamW``::

        g = grad * grad_scale                      (grad_scale negated for maximize)
        master *= decay                            decay = 1 - lr * weight_decay
        exp_avg = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)   (amsgrad; replaces exp_avg_sq below)
        master -= step_size * exp_avg / (sqrt(exp_avg_sq) / bc2_sqrt + eps)
        target_k[rows_k[i], cols_k[j]] = rne(tensor_k[i, j])   for every tensor k with a target

    master, grad, exp_avg, exp_avg_sq (, max_exp_avg_sq): float32 ``[layout.numel]``, contiguous, on
    ``layout.device`` (built by :func:`~keystone_kernels.ops.layout.build_flat_layout`, which
    validated every target once). ``scalars``: ``(decay, step_size, bc2_sqrt, grad_scale)`` as
    floats (:func:`~keystone_kernels.ops.layout.host_scalars`), or a float32 ``[5]`` tensor on the
    arenas' device holding those four and ``skip`` (non-zero: the step changes nothing), for steps
    that never read a device value on the host (``capturable``). Host work is O(1) in the number of
    tensors: nothing here loops over them.
    """
    arenas = {"master": master, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if max_exp_avg_sq is not None:
        arenas["max_exp_avg_sq"] = max_exp_avg_sq
    for name, t in arenas.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != layout.numel:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D float32 arena of {layout.numel} elements, got {got}")
        if t.device != layout.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous on {layout.device}, got {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(scalars, Tensor):
        if scalars.dtype != torch.float32 or tuple(scalars.shape) != (len(SCALARS),) or scalars.device != layout.device:
            raise ValueError(f"scalars must be a float32 tensor of shape ({len(SCALARS)},) ({', '.join(SCALARS)}) on "
                             f"{layout.device}, got {scalars.dtype} {tuple(scalars.shape)} on {scalars.device}")
    elif len(scalars) != 4:
        raise ValueError("scalars must be (decay, step_size, bc2_sqrt, grad_scale) or a float32 [5] tensor")
    fused_adamw_scatter_unchecked(layout, master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars=scalars,
                                  beta1=float(beta1), beta2=float(beta2), eps=float(eps), backend=backend)


def fused_adamw_scatter_unchecked(layout: FlatLayout, master: Tensor, grad: Tensor, exp_avg: Tensor,
                                  exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None, *,
                                  scalars: tuple[float, float, float, float] | Tensor, beta1: float, beta2: float,
                                  eps: float, backend: str | None = None) -> None:
    """:func:`fused_adamw_scatter` without its argument checks (their host cost, measured, is in
    docs/design.md section 6).

    For a caller that allocated the arenas from ``layout`` itself and checked the hyperparameters
    once: :class:`~keystone_kernels.optim.KeystoneAdamW`. Arenas of the wrong size or device are
    out-of-bounds accesses here, not errors; everyone else calls :func:`fused_adamw_scatter`.
    """
    _route(backend, layout.device).fused_adamw_scatter(
        layout, master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, beta1, beta2, eps
    )

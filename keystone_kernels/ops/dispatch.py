"""Backend choice and the public op functions.

``backend`` is one of ``"reference"``, ``"triton"``, ``"ext"`` or ``"auto"``. ``None`` means the
environment variable ``KEYSTONE_BACKEND`` if set, else ``"auto"``: Triton for CUDA tensors when
Triton imports, else the C++ extension when it loads (or builds), else the plain PyTorch
reference. An explicit backend that cannot run on the given device raises RuntimeError.

The public functions validate their inputs once, here, with ValueErrors that name the argument;
the backends then assume valid inputs. Index values (range, and uniqueness where an op writes)
are checked once per index tensor and remembered while the tensor is alive and unmodified, so
that a GPU training loop pays the device sync of that check only on the first step.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
import weakref
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "gather_wgrad",
    "scatter_to_frozen",
    "fused_adamw_scatter",
]

BACKENDS = ("reference", "triton", "ext")
_ENV = "KEYSTONE_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- backend choice


@functools.lru_cache(maxsize=None)
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("keystone_kernels.ops.triton")
    except ImportError:
        return None


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
    from . import ext

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


def resolve_backend(name: str | None = None, device: torch.device | str | None = None) -> str:
    """The backend that will run ops for tensors on ``device``.

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
    from . import ext

    return ext


# --------------------------------------------------------------------------- validation


def _has_values(t: Tensor) -> bool:
    """False for the fake / meta tensors of torch.compile and export: their values cannot be read."""
    return not (torch.compiler.is_compiling() or t.is_meta or isinstance(t, FakeTensor))


def _check_tensor(name: str, t, *, dim: int, dtypes=None, device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other tensors")


# id(index tensor) -> (weakref, _version, bound, unique checked)
_checked_indices: dict[int, tuple[weakref.ref, int, int, bool]] = {}


def _check_index(name: str, idx, bound: int, device: torch.device, *, unique: bool) -> None:
    """idx: None or int64 [k] with values in [0, bound); strictly increasing when ``unique``."""
    if idx is None:
        return
    _check_tensor(name, idx, dim=1, dtypes=(torch.int64,), device=device)
    if idx.numel() == 0 or not _has_values(idx):
        return
    key = id(idx)
    hit = _checked_indices.get(key)
    if hit is not None and hit[0]() is idx and hit[1] == idx._version and hit[2] == bound and (hit[3] or not unique):
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= bound:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds {bad}, out of range [0, {bound})")
    if unique and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique (strictly increasing): the op writes each index once")
    ref = weakref.ref(idx, lambda _, key=key: _checked_indices.pop(key, None))
    _checked_indices[key] = (ref, idx._version, bound, unique)


def _route(backend: str | None, device: torch.device) -> ModuleType:
    return _backend_module(resolve_backend(backend, device))


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
    Returns float32 [n (or out), m (or in)], accumulated in fp32; zeros when T == 0. Nothing of
    size [out, in] is allocated unless rows and cols are both None.
    """
    _check_tensor("grad_out", grad_out, dim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor("x", x, dim=2, dtypes=(grad_out.dtype,), device=grad_out.device)
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"grad_out [T, out] and x [T, in] must have the same T, got {tuple(grad_out.shape)} and {tuple(x.shape)}"
        )
    _check_index("rows", rows, grad_out.shape[1], grad_out.device, unique=False)
    _check_index("cols", cols, x.shape[1], grad_out.device, unique=False)
    return _route(backend, grad_out.device).gather_wgrad(grad_out, x, rows, cols)


def _check_scatter_target(weight, src, rows, cols, *, suffix: str = "", src_name: str = "src") -> None:
    """weight [out, in] float; src fp32 [len(rows) or out, len(cols) or in]; unique in-range indices.

    ``suffix`` (e.g. "[3]") names the element of a list argument in the errors.
    """
    _check_tensor(f"weight{suffix}", weight, dim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor(f"{src_name}{suffix}", src, dim=2, dtypes=(torch.float32,), device=weight.device)
    _check_index(f"rows{suffix}", rows, weight.shape[0], weight.device, unique=True)
    _check_index(f"cols{suffix}", cols, weight.shape[1], weight.device, unique=True)
    n = weight.shape[0] if rows is None else rows.shape[0]
    m = weight.shape[1] if cols is None else cols.shape[0]
    if tuple(src.shape) != (n, m):
        raise ValueError(f"{src_name}{suffix} must have shape ({n}, {m}) = (len(rows) or out, len(cols) or in), "
                         f"got {tuple(src.shape)}")


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
    _check_scatter_target(weight, src, rows, cols)
    _route(backend, weight.device).scatter_to_frozen(weight, src, rows, cols)


def _per_tensor(name: str, value, count: int, convert) -> list:
    """A scalar broadcast to ``count`` values, or a sequence of exactly ``count``; each converted."""
    values = list(value) if isinstance(value, Sequence) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} must be one number or one per tensor ({count}), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(convert(v))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}[{i}] = {v!r}: {err}") from None
    return out


def _as_step(v) -> int:
    f = float(v)  # ints, floats and 0-dim tensors (torch keeps optimizer steps as float tensors)
    if not f.is_integer() or f < 1:
        raise ValueError("a step must be a whole number >= 1 (the 1-based count of this update)")
    return int(f)


def fused_adamw_scatter(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    weights: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None],
    *,
    lr: float | Sequence[float],
    weight_decay: float | Sequence[float] = 0.01,
    step: int | Sequence[int],
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    backend: str | None = None,
) -> None:
    """One AdamW step on every keystone tensor, then the new values scattered into the frozen weights.

    Per tensor k, elementwise, the math of ``torch.optim.AdamW``::

        g = grads[k] * grad_scale                (negated when maximize)
        params[k] *= 1 - lr[k] * weight_decay[k]
        exp_avgs[k] = lerp(exp_avgs[k], g, 1 - beta1)
        exp_avg_sqs[k] = beta2 * exp_avg_sqs[k] + (1 - beta2) * g * g
        max_exp_avg_sqs[k] = max(max_exp_avg_sqs[k], exp_avg_sqs[k])    (amsgrad; used below)
        params[k] -= lr[k] / bc1 * exp_avgs[k] / (sqrt(exp_avg_sqs[k]) / sqrt(bc2) + eps)
        weights[k][rows[k]][:, cols[k]] = rne(params[k])

    with ``bc1 = 1 - beta1**step[k]``, ``bc2 = 1 - beta2**step[k]``.

    params, grads, exp_avgs, exp_avg_sqs (, max_exp_avg_sqs): float32 [n_k, m_k], contiguous, one
    device. weights[k]: the frozen [out, in] float32 / bfloat16 / float16 weight that params[k]
    lives in at (rows[k], cols[k]) (sorted unique int64, or None for all); several tensors may
    share one weight as long as their elements are disjoint (a row tensor and the column tensor
    of the other rows). lr, weight_decay: one float or one per tensor (param groups); step: the
    1-based number of this update, one or one per tensor, already incremented by the caller.
    """
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "weights": weights, "rows": rows, "cols": cols}
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs (one float32 tensor per param)")
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    elif max_exp_avg_sqs:
        raise ValueError("max_exp_avg_sqs given but amsgrad=False: pass amsgrad=True to use them")
    for name, value in lists.items():
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list or tuple, got {type(value).__name__}")
    count = len(params)
    for name, value in lists.items():
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries, params has {count}: one per keystone tensor")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lrs = _per_tensor("lr", lr, count, float)
    wds = _per_tensor("weight_decay", weight_decay, count, float)
    steps = _per_tensor("step", step, count, _as_step)
    if count == 0:
        return
    device = params[0].device if isinstance(params[0], Tensor) else None
    state = ["grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    for k in range(count):
        p = params[k]
        _check_tensor(f"params[{k}]", p, dim=2, dtypes=(torch.float32,), device=device)
        if not p.is_contiguous():
            raise ValueError(f"params[{k}] must be contiguous")
        for name in state:
            t = lists[name][k]
            _check_tensor(f"{name}[{k}]", t, dim=2, dtypes=(torch.float32,), device=device)
            if t.shape != p.shape or not t.is_contiguous():
                raise ValueError(f"{name}[{k}] must be contiguous with params[{k}]'s shape {tuple(p.shape)}, "
                                 f"got {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
        _check_scatter_target(weights[k], p, rows[k], cols[k], suffix=f"[{k}]", src_name="params")
    _route(backend, device).fused_adamw_scatter(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs or []), list(weights),
        list(rows), list(cols), lrs, wds, steps, float(beta1), float(beta2), float(eps), bool(amsgrad),
        bool(maximize), float(grad_scale),
    )

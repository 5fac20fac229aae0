"""Argument checks of the ops, with ValueErrors that name the argument: shared by the router and the layout.

Index values (range, and uniqueness where an op writes) are checked once per index tensor and
remembered while the tensor is alive and unmodified, so that a GPU training loop pays the device
sync of that check only on the first step.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "has_values", "check_tensor", "check_index", "check_target"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_values(t: Tensor) -> bool:
    """False for the fake / meta tensors of torch.compile and export: their values cannot be read."""
    if torch.compiler.is_compiling() or t.is_meta:
        return False
    # Not imported at start-up (it pulls in torch._dynamo, seconds per process): where the module
    # was never loaded, no fake tensor can exist.
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    return fake is None or not isinstance(t, fake.FakeTensor)


def check_tensor(name: str, t, *, dim: int, dtypes=None, device: torch.device | None = None) -> None:
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


def check_index(name: str, idx, bound: int, device: torch.device, *, unique: bool) -> None:
    """idx: None or int64 [k] with values in [0, bound); strictly increasing when ``unique``."""
    if idx is None:
        return
    check_tensor(name, idx, dim=1, dtypes=(torch.int64,), device=device)
    if idx.numel() == 0 or not has_values(idx):
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


def check_target(weight, rows, cols, shape: tuple[int, int], *, suffix: str = "", src_name: str = "src") -> None:
    """weight [out, in] float; unique in-range indices; shape == (len(rows) or out, len(cols) or in).

    ``suffix`` (e.g. "[3]") names the element of a list argument in the errors.
    """
    check_tensor(f"weight{suffix}", weight, dim=2, dtypes=FLOAT_DTYPES)
    check_index(f"rows{suffix}", rows, weight.shape[0], weight.device, unique=True)
    check_index(f"cols{suffix}", cols, weight.shape[1], weight.device, unique=True)
    n = weight.shape[0] if rows is None else rows.shape[0]
    m = weight.shape[1] if cols is None else cols.shape[0]
    if tuple(shape) != (n, m):
        raise ValueError(f"{src_name}{suffix} must have shape ({n}, {m}) = (len(rows) or out, len(cols) or in), "
                         f"got {tuple(shape)}")

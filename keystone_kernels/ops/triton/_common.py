"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (tests only)."""
    for t in tensors:
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        raise RuntimeError(
            f"keystone_triton::{op}: Triton kernels need CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, for tests), got a tensor on {t.device}"
        )


@triton.jit
def f32_to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (what torch's .to(torch.bfloat16) does).

    Written with integer ops because the Triton 3.x interpreter truncates in its own fp32 -> bf16
    cast; on the GPU this compiles to the same result as the hardware cvt.rn.bf16.f32.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    out = (bits >> 16).to(tl.uint16)
    out = tl.where(x != x, tl.full(out.shape, 0x7FC0, tl.uint16), out)
    return out.to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest even into ``DTYPE`` (tl.float32, tl.bfloat16 or tl.float16)."""
    if DTYPE == tl.bfloat16:
        return f32_to_bf16_rne(x)
    else:
        return x.to(DTYPE)  # fp16: rtne on the GPU and in the interpreter (numpy); fp32: identity


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context to launch a kernel on ``t``: Triton launches on the current CUDA device, which
    need not be ``t``'s (e.g. ``cuda:1``); on CPU tensors (the interpreter) nothing to do."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def index_or_arange(IDX, offs, mask, HAS_IDX: tl.constexpr):
    """``IDX[offs]`` (masked loads) when the op was given an index, else ``offs`` itself ("all, in order")."""
    if HAS_IDX:
        return tl.load(IDX + offs, mask=mask, other=0)
    else:
        return offs

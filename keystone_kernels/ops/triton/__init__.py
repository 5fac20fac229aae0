"""The ``triton`` backend: Triton kernels registered as ``keystone_triton::*`` ops.

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests). Kernels launch on
their tensors' device (``cuda:1`` included), whatever the current device.

Registration: every op is one opaque ``torch.library.custom_op`` with a ``register_fake`` shape
function, on the GPU and under the interpreter alike. torch.compile puts the op in its graph
as a single call (no graph break) and runs the launcher at run time.

The alternative, ``torch.library.triton_op`` + ``wrap_triton``, lets Inductor see the kernel and
emit its launch in the generated code. We do not use it because:

- under the interpreter ``wrap_triton`` hands back the plain interpreted kernel, which torch.compile
  then runs on fake tensors and fails ("Cannot access data pointer"): a triton_op registration
  could not be compiled, or tested under torch.compile, anywhere but on a GPU;
- torch.compile traces a triton_op's launcher, so its tuning branches (block sizes from the index
  lengths, T splits from the token count) would add shape guards, and recompiles when one flips,
  where the fake function here only states the output shape;
- what Inductor gains is the launch overhead of one GEMM-sized kernel: it fuses nothing into a
  user kernel.
"""

from __future__ import annotations

import torch

# Imported for their side effect: registering the keystone_triton::* ops.
from . import adamw as _adamw  # noqa: F401
from . import scatter as _scatter  # noqa: F401
from . import wgrad as _wgrad  # noqa: F401

__all__ = ["gather_wgrad", "scatter_to_frozen", "fused_adamw_scatter"]


def gather_wgrad(grad_out, x, rows, cols):
    # Eager calls on plain tensors skip the custom_op hop (about 9 us of host time per call, measured on
    # the H200 machine); torch.compile, export and fake or functional tensors (subclasses) go through it.
    if torch.compiler.is_compiling() or type(grad_out) is not torch.Tensor:
        return torch.ops.keystone_triton.gather_wgrad(grad_out, x, rows, cols)
    return _wgrad.gather_wgrad(grad_out, x, rows, cols)


def scatter_to_frozen(weight, src, rows, cols):
    torch.ops.keystone_triton.scatter_to_frozen(weight, src, rows, cols)


def fused_adamw_scatter(*args):
    _adamw.fused_adamw_scatter(*args)  # a plain launcher: the optimizer step is not traced

"""The ``triton`` backend: Triton kernels registered as ``keystone_triton::*`` ops.

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests). The ops are
``torch.library.triton_op``s so that torch.compile can see into them on the GPU.
"""

from __future__ import annotations

import torch

# Imported for their side effect: registering the keystone_triton::* ops.
from . import adamw as _adamw  # noqa: F401
from . import scatter as _scatter  # noqa: F401
from . import wgrad as _wgrad  # noqa: F401

__all__ = ["gather_wgrad", "scatter_to_frozen", "fused_adamw_scatter"]


def gather_wgrad(grad_out, x, rows, cols):
    return torch.ops.keystone_triton.gather_wgrad(grad_out, x, rows, cols)


def scatter_to_frozen(weight, src, rows, cols):
    torch.ops.keystone_triton.scatter_to_frozen(weight, src, rows, cols)


def fused_adamw_scatter(*args):
    torch.ops.keystone_triton.fused_adamw_scatter(*args)

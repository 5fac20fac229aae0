"""The op layer: one contract, three backends (reference, triton, ext).

Public functions validate their inputs and route to the backend chosen by
:func:`resolve_backend` (argument, else ``$KEYSTONE_BACKEND``, else auto).
"""

from .dispatch import (
    AUTO_CUDA_OPS,
    BACKENDS,
    available_backends,
    fused_adamw_scatter,
    gather_wgrad,
    resolve_backend,
    scatter_to_frozen,
)

__all__ = [
    "AUTO_CUDA_OPS",
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "gather_wgrad",
    "scatter_to_frozen",
    "fused_adamw_scatter",
]

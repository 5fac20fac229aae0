"""KeystoneAdamW: AdamW over flat arenas of keystone tensors, fused with the scatter into the frozen weights."""

from .adamw import KeystoneAdamW

__all__ = ["KeystoneAdamW"]

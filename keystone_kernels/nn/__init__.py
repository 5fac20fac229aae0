"""The keystone layer: KeystoneLinear, its tensors (KeystoneParameter) and the hooks that keep it in sync."""

from .linear import KeystoneLinear, KeystoneWrite
from .parameter import KeystoneParameter

__all__ = ["KeystoneLinear", "KeystoneParameter", "KeystoneWrite"]

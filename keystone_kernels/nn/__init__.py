"""The keystone layer: KeystoneLinear, its tensors (KeystoneParameter) and the hooks that keep it in sync."""

from .linear import KeystoneLinear, KeystoneWrite
from .parameter import KeystoneParameter, kind_of, owner_of, tagged_owner

__all__ = ["KeystoneLinear", "KeystoneParameter", "KeystoneWrite", "kind_of", "owner_of", "tagged_owner"]

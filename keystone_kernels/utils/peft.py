"""Is this a PEFT model, and what is inside it: the checks every layer may make without importing peft.

``peft`` is an optional dependency (``pip install keystone-kernels[peft]``). A model cannot be a
``PeftModel`` unless peft was imported by someone, so detection looks in ``sys.modules`` and never
imports it; :func:`require_peft` imports it for the code that needs it.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["PEFT_HINT", "require_peft", "is_peft_model", "base_model_of", "tuner_layer_type"]

PEFT_HINT = "install it with: pip install 'keystone-kernels[peft]' (or pip install peft)"


def require_peft():
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"LoRA needs the optional package peft; {PEFT_HINT}") from err
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (never imports peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model_of(model: nn.Module) -> nn.Module:
    """The Transformers model inside a PeftModel (with the adapters injected), else ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def tuner_layer_type() -> type:
    """PEFT's base class of every adapter layer (``BaseTunerLayer``)."""
    return require_peft().tuners.tuners_utils.BaseTunerLayer

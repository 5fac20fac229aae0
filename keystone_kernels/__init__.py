"""keystone-kernels: find the keystone neurons of a Hugging Face LLM and fine-tune only them.

Public API (everything else is private)::

    model, tok = keystone_kernels.load_default_model()
    found = keystone_kernels.find_keystone(model, tok)          # prompts: {group: [str]}
    with keystone_kernels.ablate(model, found.mask):
        ...                                                      # the model collapses here
    keystone_kernels.patch(model, found.mask)                    # only keystone rows/cols train
"""

from .adapter import load_adapter, save_adapter
from .arch import ALL_TYPES, PAPER_TYPES, RESIDUAL_TYPES
from .discovery import Discovery, default_prompts, find_keystone, select_top
from .distributed import check_replicas
from .fsdp import fully_shard, save_merged
from .linear import KeystoneLinear, KeystoneParameter
from .loading import load_base_weights
from .mask import KeystoneMask
from .models import load_default_model, load_model
from .optim import KeystoneAdamW
from .overlap import Overlap, overlap
from .patching import keystone_parameters, merge, patch, sync_frozen
from .verify import (
    ablate,
    collapse_table,
    default_texts,
    evaluate_perplexity,
    scale,
    score_exact_match,
    score_multiple_choice,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_TYPES",
    "PAPER_TYPES",
    "RESIDUAL_TYPES",
    "Discovery",
    "KeystoneAdamW",
    "KeystoneLinear",
    "KeystoneParameter",
    "KeystoneMask",
    "Overlap",
    "ablate",
    "check_replicas",
    "collapse_table",
    "default_prompts",
    "default_texts",
    "evaluate_perplexity",
    "find_keystone",
    "fully_shard",
    "keystone_parameters",
    "load_adapter",
    "load_base_weights",
    "load_default_model",
    "load_model",
    "merge",
    "overlap",
    "patch",
    "save_adapter",
    "save_merged",
    "scale",
    "score_exact_match",
    "score_multiple_choice",
    "select_top",
    "sync_frozen",
]

"""keystone-kernels: find the keystone neurons of a Hugging Face LLM and fine-tune only them.

Public API (everything else is private)::

    model, tok = keystone_kernels.load_default_model()
    found = keystone_kernels.find_keystone(model, tok)          # prompts: {group: [str]}
    with keystone_kernels.ablate(model, found.mask):
        ...                                                      # the model collapses here
    keystone_kernels.patch(model, found.mask)                    # only keystone rows/cols train
"""

from .analysis.discovery import Discovery, default_prompts, find_keystone, select_top
from .analysis.overlap import Overlap, overlap
from .analysis.verify import (
    ablate,
    collapse_table,
    default_texts,
    evaluate_perplexity,
    scale,
    score_exact_match,
    score_multiple_choice,
)
from .arch import ALL_TYPES, PAPER_TYPES, RESIDUAL_TYPES
from .mask import KeystoneMask
from .models import load_default_model, load_model
from .nn import KeystoneLinear, KeystoneParameter
from .optim import KeystoneAdamW
from .parallel.ddp import check_replicas
from .parallel.fsdp import fully_shard, save_merged
from .parallel.loading import load_base_weights
from .patching import load_adapter, merge, patch
from .serialization.adapter import save_adapter
from .state import keystone_parameters, sync_frozen

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

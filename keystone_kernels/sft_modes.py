"""The four ways ``sft`` trains, one class each: what becomes trainable, what a checkpoint holds, what is written last.

- ``keystone``: :func:`~keystone_kernels.patch` with the mask, :class:`~keystone_kernels.KeystoneAdamW`
  (clipping folded into its step); checkpoints and the final output are keystone adapters.
- ``random``: the same with a fair random mask of the same layout (as many neurons and rows /
  columns per projection: ``KeystoneMask.random_like(match="weights")``).
- ``lora``: PEFT LoRA on the decoder projections (:mod:`keystone_kernels.integrations.lora`), torch
  AdamW; checkpoints and the final output are PEFT adapter folders.
- ``full``: every parameter, torch AdamW (foreach); checkpoints hold the whole model.
- ``paper``: the recipe the paper's code runs (keystone rows / columns plus every parameter that is
  not a weight of q, k, v, o, up or down), and its two controls ``paper-without-keystone`` (the
  extra parameters alone) and ``paper-random`` (the extras and a fair random mask).

The training loop (:mod:`keystone_kernels.sft`) asks the mode and never branches on its name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from .integrations.lora import add_lora, load_lora_weights, lora_optimizer, merge_lora, save_lora
from .mask import KeystoneMask
from .nn.parameter import kind_of
from .optim import KeystoneAdamW
from .patching import load_adapter, merge, patch
from .serialization.adapter import read_adapter, save_adapter
from .sft_config import MODES

__all__ = ["Mode", "mode_of"]


class Mode:
    """One way to train. ``weights`` names what a checkpoint holds besides ``optimizer.pt`` / ``scheduler.pt``;
    ``final`` what the run writes into its output folder at the end (None: nothing)."""

    name: str
    weights: str
    final: str | None = None
    clips_in_step = False  # the optimizer clips gradients itself (else the loop calls clip_grad_norm_)
    needs_mask = False  # prepare() takes the keystone mask (the CLI finds one when --mask is not given)

    def prepare(self, model: nn.Module, mask: KeystoneMask | None, config) -> tuple[torch.optim.Optimizer,
                                                                                    KeystoneMask | None]:
        """Make ``model`` trainable in place; ``(optimizer, the mask trained, or None)``."""
        raise NotImplementedError

    def save(self, model: nn.Module, path: Path) -> None:
        """Write the trained weights to ``path`` (a checkpoint's ``weights``, or the run's ``final``)."""
        raise NotImplementedError

    def check(self, path: Path) -> None:
        """Read ``path`` (written by :meth:`save`) whole; any exception means it does not load."""
        raise NotImplementedError

    def restore(self, model: nn.Module, path: Path, config) -> torch.optim.Optimizer:
        """Load ``path`` into the unprepared ``model`` and prepare it; returns a fresh optimizer."""
        raise NotImplementedError

    def merged(self, model: nn.Module) -> nn.Module:
        """The plain model to ``save_pretrained`` (in place where the mode allows)."""
        return model


def optimizer_settings(config) -> dict:
    """The KeystoneAdamW settings every keystone mode shares: the backend, and with ``config.compile`` a
    capturable step whose device work is one compiled graph (non-finite steps are then skipped and counted,
    not raised: the host never reads the norm)."""
    settings = {"backend": config.backend}
    if config.compile:
        settings.update(capturable=True, compile_step=True)
    return settings


class KeystoneMode(Mode):
    name, weights, final, clips_in_step = "keystone", "adapter.safetensors", "keystone_adapter.safetensors", True
    needs_mask = True
    also_train: str | None = None  # patch(also_train=...): dense parameters trained beside the keystone tensors

    def training_mask(self, mask: KeystoneMask, model: nn.Module, config) -> KeystoneMask:
        return mask

    def optimizer(self, model: nn.Module, config) -> KeystoneAdamW:
        return KeystoneAdamW.for_model(model, lr=config.learning_rate, weight_decay=config.weight_decay,
                                       max_grad_norm=config.max_grad_norm, **optimizer_settings(config))

    def prepare(self, model, mask, config):
        if mask is None and self.needs_mask:
            raise ValueError(f"mode {self.name!r} needs a mask (find_keystone(...).mask or --top-fraction)")
        mask = self.training_mask(mask, model, config)
        patch(model, mask, frozen_dtype=getattr(torch, config.frozen_dtype), backend=config.backend,
              also_train=self.also_train)
        return self.optimizer(model, config), mask

    def save(self, model, path):
        save_adapter(model, path)

    def check(self, path):
        read_adapter(path)

    def restore(self, model, path, config):
        load_adapter(model, path, frozen_dtype=getattr(torch, config.frozen_dtype), backend=config.backend)
        return self.optimizer(model, config)

    def merged(self, model):
        return merge(model)


def _random_control(mask: KeystoneMask, model: nn.Module, config) -> KeystoneMask:
    """The fair control: as many neurons and rows / columns per projection, so as many trainable weights."""
    return mask.random_like(config.seed, model, match="weights")


class RandomMode(KeystoneMode):
    name = "random"

    def training_mask(self, mask, model, config):
        return _random_control(mask, model, config)


class PaperMode(KeystoneMode):
    """The recipe the paper's code runs on one GPU (its ``train.py`` and ``mask_gradients``, strategy
    "freeze"): the keystone rows / columns of q, k, v, up / o, down, and every other parameter whole
    (gate_proj, norms, embeddings, lm_head, biases: ``patch(also_train="paper")``). Weight decay as
    transformers' Trainer gives it: on everything but norms and biases."""

    name = "paper"
    also_train = "paper"

    def optimizer(self, model, config):
        norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
        names = {id(p): n for n, p in model.named_parameters()}

        def no_decay(p):  # a bias (a keystone one, or a dense one by name) or a norm's tensor
            return kind_of(p) == "bias" or names.get(id(p), "").endswith("bias") or id(p) in norms

        return KeystoneAdamW.for_model(model, no_decay=no_decay, lr=config.learning_rate,
                                       weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                                       **optimizer_settings(config))


class PaperWithoutKeystoneMode(PaperMode):
    """Control: the paper's extra parameters alone, no keystone tensor (an empty mask)."""

    name = "paper-without-keystone"
    needs_mask = False

    def training_mask(self, mask, model, config):
        return KeystoneMask({})


class PaperRandomMode(PaperMode):
    """Control: the paper's extra parameters and a fair random mask instead of the keystone one."""

    name = "paper-random"

    def training_mask(self, mask, model, config):
        return _random_control(mask, model, config)


class LoraMode(Mode):
    name, weights, final = "lora", "lora_adapter", "lora_adapter"

    def prepare(self, model, mask, config):
        add_lora(model, r=config.lora_r)  # PEFT LoRA injected into ``model``; torch AdamW over the adapters
        return lora_optimizer(model, config.learning_rate, config.weight_decay), None

    def save(self, model, path):
        save_lora(model, path)

    def check(self, path):
        weights = sorted(Path(path).glob("*.safetensors"))
        if not weights:
            raise ValueError(f"{path} holds no adapter weights")
        for f in weights:
            load_file(os.fspath(f))

    def restore(self, model, path, config):
        optimizer, _ = self.prepare(model, None, config)
        load_lora_weights(model, path)
        return optimizer

    def merged(self, model):
        return merge_lora(model)  # fold the adapters in


class FullMode(Mode):
    name, weights = "full", "model.safetensors"

    def prepare(self, model, mask, config):
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True), None

    def save(self, model, path):
        save_model(model, os.fspath(path))

    def check(self, path):
        load_file(os.fspath(path))

    def restore(self, model, path, config):
        load_model(model, os.fspath(path))
        return self.prepare(model, None, config)[0]


_BY_NAME: dict[str, Mode] = {m.name: m for m in (KeystoneMode(), RandomMode(), LoraMode(), FullMode(), PaperMode(),
                                                   PaperWithoutKeystoneMode(), PaperRandomMode())}
assert tuple(_BY_NAME) == MODES


def mode_of(name: str) -> Mode:
    """The :class:`Mode` of a name in :data:`~keystone_kernels.sft_config.MODES`."""
    if name not in _BY_NAME:
        raise ValueError(f"mode must be one of {MODES}, got {name!r}")
    return _BY_NAME[name]

"""Using keystone training from ``transformers.Trainer`` (and TRL trainers built on it).

Two ways, both for a model already patched with :func:`keystone_kernels.patch`:

1. ``KeystoneTrainer`` instead of ``Trainer``: it builds :class:`KeystoneAdamW` from the training
   arguments (learning rate, betas, eps, weight decay) and writes / reads checkpoints as keystone
   adapters (``keystone_adapter.safetensors``, kilobytes to megabytes) instead of the whole model.
2. Keep your trainer class and pass ``optimizers=(keystone_optimizer(model, args), None)``.

Trainer keeps doing everything else: schedule, gradient accumulation and clipping
(``max_grad_norm``), logging, evaluation.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .adapter import load_adapter, save_adapter
from .optim import KeystoneAdamW
from .patching import keystone_parameters

ADAPTER_NAME = "keystone_adapter.safetensors"


def keystone_optimizer(model: torch.nn.Module, args, backend: str | None = "auto") -> KeystoneAdamW:
    """KeystoneAdamW over ``model``'s keystone tensors, with the optimizer settings of TrainingArguments ``args``."""
    return KeystoneAdamW(keystone_parameters(model), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         eps=args.adam_epsilon, weight_decay=args.weight_decay, backend=backend)


class KeystoneTrainer(Trainer):
    """``transformers.Trainer`` for a patched model: keystone optimizer, adapter checkpoints."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = keystone_optimizer(model if model is not None else self.model, self.args)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.model, os.path.join(output_dir, ADAPTER_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter(model if model is not None else self.model, os.path.join(resume_from_checkpoint, ADAPTER_NAME))

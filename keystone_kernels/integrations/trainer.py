"""Using keystone training from ``transformers.Trainer`` (and TRL trainers built on it).

Two ways, both for a model already patched with :func:`keystone_kernels.patch`:

1. ``KeystoneTrainer`` instead of ``Trainer``: it builds :class:`KeystoneAdamW` from the training
   arguments (learning rate, betas, eps, weight decay) and writes / reads checkpoints as keystone
   adapters (``keystone_adapter.safetensors``, kilobytes to megabytes) instead of the whole model.
2. Keep your trainer class and pass ``optimizers=(keystone_optimizer(model, args), None)``.

Trainer keeps doing everything else: schedule, gradient accumulation and clipping
(``max_grad_norm``), logging, evaluation.

Several GPUs: run the same script under ``torchrun --nproc-per-node N`` or ``accelerate launch
--multi_gpu``. The Trainer wraps the model in DDP, which (for a patched model) all-reduces only the
keystone gradients and never broadcasts the frozen weights; ``KeystoneTrainer.train`` first checks
that every rank holds the same model (:func:`~keystone_kernels.parallel.ddp.check_replicas`), and only
rank 0 writes checkpoints.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from ..optim import KeystoneAdamW
from ..parallel.ddp import check_replicas
from ..patching import load_adapter
from ..serialization.adapter import ADAPTER_NAME, save_adapter
from ..utils.dist import is_distributed


def keystone_optimizer(model: torch.nn.Module, args, backend: str | None = "auto") -> KeystoneAdamW:
    """KeystoneAdamW over ``model``'s keystone tensors, with the optimizer settings of TrainingArguments ``args``.

    ``torch_compile=True`` in ``args`` (the Trainer then compiles the model) also compiles the optimizer's
    device work: ``capturable=True, compile_step=True``.
    """
    compiled = bool(getattr(args, "torch_compile", False))
    return KeystoneAdamW.for_model(model, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                   eps=args.adam_epsilon, weight_decay=args.weight_decay, backend=backend,
                                   capturable=compiled, compile_step=compiled)


class KeystoneTrainer(Trainer):
    """``transformers.Trainer`` for a patched model: keystone optimizer, adapter checkpoints."""

    def train(self, *args, **kwargs):
        """``Trainer.train`` after a replica check (every rank must hold the same frozen weights and mask)."""
        if is_distributed():
            check_replicas(self.model)
        if self.args.ddp_find_unused_parameters is None:
            # every keystone tensor gets a gradient in every step: skip DDP's extra graph traversal
            self.args.ddp_find_unused_parameters = False
        return super().train(*args, **kwargs)

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

    def _load_best_model(self):
        """``load_best_model_at_end=True``: the best checkpoint is an adapter, not a full state dict."""
        best = self.state.best_model_checkpoint
        path = os.path.join(best, ADAPTER_NAME) if best else None
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(f"load_best_model_at_end: no keystone adapter at {path} "
                                    f"(best checkpoint {best!r}); "
                                    "was the checkpoint written by another trainer class?")
        load_adapter(self.model, path)

"""KeystoneTrainer / keystone_optimizer with transformers.Trainer on a tiny model (CPU)."""

import copy
import os

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from transformers import Trainer, TrainingArguments

from keystone_kernels import KeystoneAdamW, KeystoneMask, keystone_parameters, load_adapter, patch
from keystone_kernels.integrations.trainer import ADAPTER_NAME, KeystoneTrainer, keystone_optimizer
from keystone_kernels.sft_data import SFTDataset, collate
from keystone_kernels.state import keystone_modules

MASK = KeystoneMask({("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9]})
ROWS = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}"} for a in range(2, 8) for b in range(3, 6)]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _args(tmp_path, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=3, learning_rate=5e-3,
                             report_to=[], use_cpu=True, logging_strategy="no", remove_unused_columns=False, **kw)


def _setup():
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    model = patch(copy.deepcopy(base), MASK, backend="reference")
    data = _Examples(SFTDataset(ROWS, tok))
    return tok, base, model, data, lambda ex: collate(ex, tok.pad_token_id)


def test_keystone_trainer_trains_only_keystone_and_saves_an_adapter(tmp_path):
    tok, base, model, data, collator = _setup()
    before = [p.detach().clone() for p in keystone_parameters(model)]
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = KeystoneTrainer(model=model, args=_args(tmp_path, max_grad_norm=1.0), train_dataset=data,
                              data_collator=collator, processing_class=tok)
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), KeystoneAdamW)  # accelerate wraps it
    assert all(not torch.equal(a, b) for a, b in zip(keystone_parameters(model), before))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    for m in keystone_modules(model).values():  # the fused step kept the frozen copies in sync
        if m.weight_rows is not None:
            assert torch.equal(m.frozen_weight[m.rows], m.weight_rows.detach().to(m.frozen_weight.dtype))
    trainer.save_model(str(tmp_path / "final"))
    assert os.path.isfile(tmp_path / "final" / ADAPTER_NAME)
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "final" / ADAPTER_NAME, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(keystone_parameters(fresh), keystone_parameters(model)))


def test_plain_trainer_with_the_optimizer_hook(tmp_path):
    tok, _, model, data, collator = _setup()
    args = _args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                      optimizers=(keystone_optimizer(model, args, backend="reference"), None))
    result = trainer.train()
    assert result.global_step == 4 and trainer.optimizer.param_groups[0]["params"][0] is keystone_parameters(model)[0]


def test_torch_compile_in_training_arguments_matches_eager(tmp_path):
    """``TrainingArguments(torch_compile=True)``: the Trainer compiles the model (inductor) and KeystoneTrainer's
    optimizer compiles its step; the keystone tensors end where an eager run puts them, the frozen copies in sync."""
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.compiler.reset()
        counters.clear()
        tok, _, model, data, collator = _setup()
        args = _args(tmp_path / str(compiled), max_grad_norm=1.0, torch_compile=compiled, seed=3, data_seed=3)
        trainer = KeystoneTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                  processing_class=tok)
        result = trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert optimizer.compile_step is compiled and result.global_step == 4
        assert (counters["stats"]["unique_graphs"] >= 2) is compiled  # the model's graphs and the optimizer's
        runs.append(model)
    for p, q in zip(keystone_parameters(runs[0]), keystone_parameters(runs[1])):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    for m in keystone_modules(runs[1]).values():
        if m.weight_rows is not None:
            assert torch.equal(m.frozen_weight[m.rows], m.weight_rows.detach().to(m.frozen_weight.dtype))


def test_unpatched_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="call keystone_kernels.patch"):
        keystone_optimizer(tiny_model("llama"), _args(tmp_path))


def test_trainer_checkpoints_are_adapters_and_resume(tmp_path):
    tok, base, model, data, collator = _setup()
    args = _args(tmp_path / "a", save_strategy="steps", save_steps=2)
    KeystoneTrainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / ADAPTER_NAME).is_file() and not (ckpt / "model.safetensors").exists()
    resumed = patch(copy.deepcopy(base), MASK, backend="reference")
    KeystoneTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=data, data_collator=collator).train(
        resume_from_checkpoint=str(ckpt))
    for a, b in zip(keystone_parameters(resumed), keystone_parameters(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_best_model_at_end_reloads_the_best_adapter(tmp_path):
    from keystone_kernels.serialization.adapter import read_adapter

    tok, base, model, data, collator = _setup()
    args = _args(tmp_path, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                 # "best" = highest eval loss: an early checkpoint, so reloading it is visible
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = KeystoneTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator,
                              processing_class=tok)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{trainer.state.global_step}")
    saved, _ = read_adapter(os.path.join(best, ADAPTER_NAME))
    modules = keystone_modules(model)
    for name, value in saved.items():
        path, _, attr = name.rpartition(".")
        assert torch.equal(getattr(modules[path], attr).detach(), value), f"{name} is not the best checkpoint's"

"""No update may miss the model: any optimizer, any trainer and any direct edit reach the frozen weights.

Before the step hooks and KeystoneParameter, a patched model trained with anything but KeystoneAdamW
kept its loss to the last digit: the fp32 masters moved, the bf16 frozen weight (what the forward
uses) did not. Each case here trains, or edits, and then checks three things: the loss moved the
way the update says, the frozen weight holds the rounded masters, and a merged plain model gives
the patched model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from keystone_kernels import KeystoneAdamW, KeystoneMask, keystone_parameters, merge, patch, sync_frozen
from keystone_kernels.nn.linear import KeystoneParameter
from keystone_kernels.state import keystone_modules

# rows, columns, rows and columns, a bias-free model: every kind of keystone tensor of a Llama
MASK = KeystoneMask({("attn_q", 0, None): [1, 5, 17], ("fwd_up", 1, None): [0, 70], ("attn_o", 1, None): [3],
                     ("fwd_down", 0, None): [4, 9], ("res_mlp", 0, None): [2]})


def _patched(frozen_dtype=torch.bfloat16):
    return patch(tiny_model("llama", seed=3), MASK, frozen_dtype=frozen_dtype, backend="reference").train()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def assert_in_sync(model) -> None:
    """Every frozen weight holds its layer's fp32 masters rounded to the frozen dtype."""
    for name, m in keystone_modules(model).items():
        merged, _ = m.merged_weight(torch.float32, masters=True)
        assert torch.equal(m.frozen_weight, merged.to(m.frozen_weight.dtype)), name


def assert_merge_reproduces(model, ids) -> None:
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = merge(copy.deepcopy(model))(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _bnb_adamw8bit(params, lr):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=1)  # 8-bit state even for tiny tensors


def _hf_adafactor(params, lr):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),  # writes without bumping versions
    "adafactor-torch": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "adafactor-transformers": lambda p: _hf_adafactor(p, 1e-2),
    "bnb-adamw8bit": lambda p: _bnb_adamw8bit(p, 1e-2),  # raw data pointers: only the step hook sees it
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_any_optimizer_trains_a_patched_model(name):
    model = _patched()
    opt = OPTIMIZERS[name](keystone_parameters(model))
    ids = _ids()
    first = _loss(model, ids)
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert _loss(model, ids) < first - 1e-3
    assert_in_sync(model)
    assert_merge_reproduces(model, ids)


def test_any_optimizer_matches_keystone_adamw_through_the_model():
    """torch's AdamW and KeystoneAdamW make the same model: the forward sees torch's updates step by step."""
    a, b = _patched(torch.float32), _patched(torch.float32)
    opt_a = torch.optim.AdamW(keystone_parameters(a), lr=1e-2, fused=True)
    opt_b = KeystoneAdamW(keystone_parameters(b), lr=1e-2, backend="reference")
    for step in range(4):
        ids = _ids(step)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        assert _loss(a, ids) == pytest.approx(_loss(b, ids), rel=1e-5)


def test_the_default_hf_trainer_trains_a_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    from keystone_kernels.sft_data import SFTDataset, collate

    tok = tiny_tokenizer()
    model = _patched()
    rows = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}"} for a in range(2, 8) for b in range(3, 6)]
    data = list(SFTDataset(rows, tok))
    batch = collate(data[:6], tok.pad_token_id)
    with torch.no_grad():
        first = float(model(**batch).loss)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=6,
                             learning_rate=5e-2, report_to=[], use_cpu=True, logging_strategy="no",
                             save_strategy="no", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=lambda ex: collate(ex, tok.pad_token_id))
    trainer.train()
    assert not isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), KeystoneAdamW)
    with torch.no_grad():
        assert float(model(**batch).loss) < first - 1e-2
    assert_in_sync(model)
    assert_merge_reproduces(model, batch["input_ids"])


# ---------------------------------------------------------------------------------------- direct edits
def _edit_copy(p, new):
    with torch.no_grad():
        p.copy_(new)


def _edit_data_copy(p, new):
    p.data.copy_(new)


def _edit_data_assign(p, new):
    p.data = new.clone()


def _edit_slice(p, new):
    p.data[0] = new[0]  # a part of it, through .data
    p.data[1:] = new[1:]


EDITS = {"copy_": _edit_copy, "data.copy_": _edit_data_copy, "data = ": _edit_data_assign, "data[i] = ": _edit_slice}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_direct_edit_is_seen_by_the_next_forward_and_merge(edit):
    model = _patched()
    ids = _ids()
    before = model(input_ids=ids).logits.detach()
    params = keystone_parameters(model)
    assert all(isinstance(p, KeystoneParameter) for p in params)
    new = [p.detach() + torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.5
           for k, p in enumerate(params)]
    for p, v in zip(params, new):
        EDITS[edit](p, v)
    after = model(input_ids=ids).logits.detach()
    assert not torch.allclose(after, before)
    assert all(torch.equal(p.detach(), v) for p, v in zip(keystone_parameters(model), new))
    assert_in_sync(model)
    fresh = _patched()  # the same base with the new values given at patch time: the same logits
    with torch.no_grad():
        for p, v in zip(keystone_parameters(fresh), new):
            p.copy_(v)
    sync_frozen(fresh)
    torch.testing.assert_close(fresh(input_ids=ids).logits, after, rtol=0, atol=0)
    assert_merge_reproduces(model, ids)


@pytest.mark.parametrize("edit", list(EDITS))
def test_merge_sees_an_edit_that_no_forward_saw(edit):
    model = _patched()
    p = keystone_parameters(model)[0]
    EDITS[edit](p, p.detach() + 1.0)
    m = next(m for m in keystone_modules(model).values() if m.weight_rows is p)
    weight, _ = m.merged_weight(torch.float32)
    assert torch.equal(weight[m.rows], (p.detach()).bfloat16().float())


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("then_sync", [False, True])
def test_an_edit_after_keystone_steps_survives_the_next_step(edit, then_sync):
    """README told users to edit and call sync_frozen; the next KeystoneAdamW step used to write the old values back."""
    model = _patched(torch.float32)
    params = keystone_parameters(model)
    opt = KeystoneAdamW(params, lr=1e-2, backend="reference")
    ids = _ids()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    edited = [p.detach() + 1.0 for p in params]
    for p, v in zip(params, edited):
        EDITS[edit](p, v)
    if then_sync:
        sync_frozen(model)
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for p, v in zip(params, edited):  # one AdamW step of lr 1e-2 from the edited values, not from the old ones
        assert float((p.detach() - v).abs().max()) <= 1.1e-2
    assert_in_sync(model)


def test_load_state_dict_into_a_patched_model_is_seen():
    model, source = _patched(), _patched()
    with torch.no_grad():
        for p in keystone_parameters(source):
            p.add_(0.25)
    sync_frozen(source)
    model.load_state_dict(source.state_dict())
    ids = _ids()
    torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=0)


def test_a_replaced_parameter_object_is_tagged_and_seen():
    model = _patched()
    m = next(m for m in keystone_modules(model).values() if m.weight_rows is not None)
    new = torch.nn.Parameter(m.weight_rows.detach() + 1.0)
    m.weight_rows = new
    assert isinstance(new, KeystoneParameter) and m.weight_rows is new
    model(input_ids=_ids())
    assert torch.equal(m.frozen_weight[m.rows], new.detach().bfloat16())


def _steps_counting_syncs(monkeypatch, model, opt, ids, steps: int) -> list:
    """Take ``steps`` training steps; one entry per KeystoneLinear.sync_frozen call made meanwhile."""
    from keystone_kernels.nn.linear import KeystoneLinear

    syncs = []
    real = KeystoneLinear.sync_frozen
    monkeypatch.setattr(KeystoneLinear, "sync_frozen", lambda self, *a, **k: syncs.append(1) or real(self, *a, **k))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return syncs


def test_keystone_adamw_steps_do_not_rescatter_in_the_forward(monkeypatch):
    """The version check costs no scatter when only KeystoneAdamW writes."""

    model = _patched()
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, backend="reference")
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    syncs = _steps_counting_syncs(monkeypatch, model, opt, ids, steps=3)
    assert syncs == []


def test_a_plain_optimizer_over_a_merged_model_is_refused_before_it_steps():
    model = _patched()
    params = keystone_parameters(model)
    opt = torch.optim.SGD(params, lr=0.1)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    merge(model)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="belongs to a KeystoneLinear that was (merged|freed)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_optimizers_of_unpatched_models_are_left_alone():
    model = tiny_model("llama")
    _patched()  # a live KeystoneLinear elsewhere in the process
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_an_unseen_edit_does_not_undo_an_ablation():
    """An edit no forward has seen yet is scattered before ablate edits the frozen weights, not inside the block."""
    from keystone_kernels import ablate

    model = _patched()
    m = next(m for m in keystone_modules(model).values() if m.weight_rows is not None)
    with torch.no_grad():
        m.weight_rows.add_(1.0)
    ids = _ids()
    with ablate(model, MASK):
        model(input_ids=ids)
        assert not bool(m.frozen_weight[m.rows].any())
    model(input_ids=ids)
    assert torch.equal(m.frozen_weight[m.rows], m.weight_rows.detach().bfloat16())


@pytest.mark.parametrize("inner", ["keystone", "sgd"])
def test_a_wrapped_optimizer_is_scattered_once_per_step(inner, monkeypatch):
    """accelerate's AcceleratedOptimizer (what the HF Trainer steps) is itself a torch Optimizer: only the wrapped
    optimizer's step scatters, once per layer (plain optimizers) or never (KeystoneAdamW, in its fused op)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer


    model = _patched()
    params = keystone_parameters(model)
    base = KeystoneAdamW(params, lr=1e-2, backend="reference") if inner == "keystone" else torch.optim.SGD(params, 0.5)
    opt = Accelerator(cpu=True).prepare_optimizer(base)
    assert isinstance(opt, AcceleratedOptimizer)
    ids = _ids()
    first = _loss(model, ids)
    syncs = _steps_counting_syncs(monkeypatch, model, opt, ids, steps=3)
    layers = sum(1 for m in keystone_modules(model).values() if m.keystone_parameters())
    assert len(syncs) == (0 if inner == "keystone" else 3 * layers)
    assert _loss(model, ids) < first - 1e-3
    assert_in_sync(model)

"""The paper's training recipe: patch(also_train="paper") trains the keystone tensors and every parameter its code
leaves unmasked; the sft modes paper / paper-without-keystone / paper-random run it and its two controls."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from tiny import FAMILY_CONFIGS, tiny_model, write_sft_files

from keystone_kernels import KeystoneAdamW, KeystoneMask, load_adapter, merge, patch, save_adapter
from keystone_kernels.cli import main
from keystone_kernels.patching import planned_shapes
from keystone_kernels.serialization.adapter import trained_shapes
from keystone_kernels.state import dense_parameters, keystone_modules, trainable_parameters

MASK = KeystoneMask({("attn_q", 0, None): [1, 5, 17], ("fwd_up", 1, None): [0, 70], ("attn_o", 1, None): [3],
                     ("fwd_down", 0, None): [4, 9]})
SIX = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _tied_llama():
    config = FAMILY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _expected_dense(model) -> set[str]:
    """Every parameter that is not the weight of one of the six projections (what the paper's code leaves unmasked),
    less the biases of the six, which become whole-bias keystone tensors."""
    return {n for n, _ in model.named_parameters()
            if not any(f".{proj}." in f".{n}" for proj in SIX)}


@pytest.mark.parametrize("family", ["llama", "qwen2", "tied-llama"])
def test_paper_trains_exactly_the_parameters_its_code_leaves_unmasked(family):
    model = _tied_llama() if family == "tied-llama" else tiny_model(family)
    before = dict(model.named_parameters())
    expected_dense = _expected_dense(model)
    assert any("gate_proj" in n for n in expected_dense) and any("norm" in n for n in expected_dense)
    patch(model, MASK, backend="reference", also_train="paper")
    assert set(dense_parameters(model)) == expected_dense
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keystone = {f"{path}.{attr}" for path, m in keystone_modules(model).items()
                for attr in ("weight_rows", "weight_cols", "bias_rows") if getattr(m, attr) is not None}
    assert trainable == expected_dense | keystone
    assert not any(".gate_proj." in path for path in keystone_modules(model))  # gate_proj stays a dense nn.Linear
    if family == "qwen2":  # every bias of q / k / v trains whole
        biased = [m for m in keystone_modules(model).values() if m.frozen_bias is not None]
        assert biased and all(m.bias_all and m.bias_rows.shape == (m.out_features,) for m in biased)
    if family == "tied-llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        assert "lm_head.weight" not in dense_parameters(model) or "model.embed_tokens.weight" not in dense_parameters(
            model)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model))
    assert len({id(p) for p in trainable_parameters(model)}) == len(trainable_parameters(model))
    # the keystone part is unchanged: the same rows and columns as without also_train
    plain = patch(tiny_model("llama") if family != "qwen2" else tiny_model("qwen2"), MASK, backend="reference")
    for path, m in keystone_modules(plain).items():
        if ".gate_proj" in path:
            continue
        twin = keystone_modules(model)[path]
        assert torch.equal(m.rows, twin.rows) and torch.equal(m.cols, twin.cols)
    assert set(before) >= expected_dense


def _train(model, steps: int = 4, lr: float = 1e-2):
    opt = KeystoneAdamW.for_model(model, lr=lr, backend="reference")
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return ids


@pytest.mark.parametrize("family", ["qwen2", "tied-llama"])
def test_paper_save_load_and_merge_reproduce_the_trained_outputs(family, tmp_path):
    make = _tied_llama if family == "tied-llama" else (lambda: tiny_model(family))
    base = make()
    model = patch(copy.deepcopy(base), MASK, backend="reference", also_train="paper")
    norm_before = model.model.norm.weight.detach().clone()
    ids = _train(model)
    assert not torch.equal(model.model.norm.weight.detach(), norm_before)  # the dense extras trained
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter.safetensors", backend="reference")
    assert trained_shapes(loaded) == trained_shapes(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
        merged = merge(copy.deepcopy(model))
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    assert all(p.dtype == next(base.parameters()).dtype for p in merged.parameters())
    if family == "tied-llama":
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_planned_shapes_are_what_patch_makes():
    for also in (None, "paper", ["model.norm.weight", "model.layers.1.mlp.gate_proj.weight"]):
        model = tiny_model("qwen2")
        planned = planned_shapes(model, MASK, also_train=also)
        patch(model, MASK, backend="reference", also_train=also)
        assert planned == trained_shapes(model)


def test_also_train_errors():
    with pytest.raises(ValueError, match="not parameters of"):
        patch(tiny_model("llama"), MASK, backend="reference", also_train=["model.nope.weight"])
    with pytest.raises(ValueError, match="a weight the mask already trains"):
        patch(tiny_model("llama"), MASK, backend="reference", also_train=["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="also_train must be 'paper'"):
        patch(tiny_model("llama"), MASK, backend="reference", also_train="everything")
    with pytest.raises(ValueError, match="mask is empty"):
        patch(tiny_model("llama"), KeystoneMask({}), backend="reference")
    model = patch(tiny_model("llama"), KeystoneMask({}), backend="reference", also_train="paper")  # the control
    assert not any(m.keystone_parameters() for m in keystone_modules(model).values()) and dense_parameters(model)


@pytest.mark.parametrize("mode", ["paper", "paper-without-keystone", "paper-random"])
def test_sft_paper_modes_run_on_a_tiny_model(mode, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(model_dir)
    data = write_sft_files(tmp_path)
    out = tmp_path / "run"
    args = ["sft", "--model", str(model_dir), "--data", str(data / "train.jsonl"), "--no-eval", "--mode", mode,
            "--top-fraction", "0.05", "--steps", "3", "--batch-size", "3", "--save-every", "2", "--output", str(out),
            "--backend", "reference", "--merge"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["lr"] == 5e-5 and len(metrics["losses"]) == 3
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["config"]["schedule"] == "linear" and state["config"]["warmup_ratio"] == 0.03
    assert state["config"]["weight_decay"] == 0.01
    assert (out / "keystone_adapter.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    assert main(args[:-1] + ["--steps", "4", "--resume"]) == 0

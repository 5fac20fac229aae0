"""Patching on the meta device, loading base weights afterwards; models dispatched by accelerate."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model
from transformers import AutoModelForCausalLM

import keystone_kernels as kk
from keystone_kernels import KeystoneAdamW, KeystoneMask, keystone_parameters, patch

MASK = KeystoneMask({("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9],
                     ("fwd_down", 0, None): [3]})


def _meta_twin(base):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(base.config).eval()  # GPT-2 has dropout


def _ids(seed=0):
    return torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(seed))


def _one_step(model):
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, backend="reference")
    ids = _ids(1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model(input_ids=_ids(2)).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_meta_patch_then_load_base_weights_from_shards(tmp_path, family):
    base = tiny_model(family)
    want = patch(copy.deepcopy(base), MASK, backend="reference")
    sd, seen = {}, set()
    for k, v in base.state_dict().items():  # a checkpoint stores tied weights once (GPT-2: lm_head = wte)
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            sd[k] = v.contiguous()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "model-1.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "model-2.safetensors"))

    model = patch(_meta_twin(base), MASK, backend="reference")  # no weights, no memory
    assert model.model.layers[0].self_attn.q_proj.frozen_weight.is_meta if family == "llama" else True
    with pytest.raises(ValueError, match="base fingerprint is unknown"):
        kk.save_adapter(model, tmp_path / "too_early.safetensors")
    with pytest.raises(ValueError, match="pass device="):
        kk.load_base_weights(model, tmp_path)
    kk.load_base_weights(model, tmp_path, device="cpu")
    assert model._keystone.base_fingerprint == want._keystone.base_fingerprint != ""
    for (name, a), b in zip(model.named_buffers(), want.buffers()):
        assert torch.equal(a, b), name  # frozen weights, index buffers, rotary inv_freq
    for a, b in zip(keystone_parameters(model), keystone_parameters(want)):
        assert torch.equal(a, b)
    torch.testing.assert_close(_one_step(model), _one_step(want), rtol=0, atol=0)
    kk.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = kk.load_adapter(copy.deepcopy(base), tmp_path / "adapter.safetensors", backend="reference")
    torch.testing.assert_close(fresh(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=0)


def test_meta_patch_then_to_empty_and_load_state_dict():
    base = tiny_model("llama")
    want = patch(copy.deepcopy(base), MASK, backend="reference")
    model = patch(_meta_twin(base), MASK, backend="reference")
    model.to_empty(device="cpu")
    rotary = model.model.rotary_emb
    model._init_weights(rotary)  # non-persistent buffers are not in any checkpoint
    model.load_state_dict(base.state_dict())  # the base model's keys: q_proj.weight, ...
    assert model._keystone.base_fingerprint == want._keystone.base_fingerprint
    torch.testing.assert_close(_one_step(model), _one_step(want), rtol=0, atol=0)


def test_load_base_weights_refuses_incomplete_or_foreign_checkpoints():
    base = tiny_model("llama")
    sd = base.state_dict()
    model = patch(_meta_twin(base), MASK, backend="reference")
    partial = {k: v for k, v in sd.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="checkpoint lacks 3 tensors .*layers.1.mlp"):
        kk.load_base_weights(model, partial, device="cpu")
    with pytest.raises(ValueError, match="not a tensor of this LlamaForCausalLM"):
        kk.load_base_weights(model, {**sd, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        kk.load_base_weights(model, {**sd, "model.norm.weight": torch.zeros(7)})


def test_models_dispatched_over_devices_or_offloaded_are_refused():
    from accelerate import cpu_offload, dispatch_model

    one = dispatch_model(tiny_model("llama"), device_map={"": "cpu"})  # one device: patch works
    patch(one, MASK, backend="reference")
    split = tiny_model("llama")
    split.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": 1}
    with pytest.raises(ValueError, match=r"by accelerate \(device_map over \['0', '1', 'cpu'\].* meta device"):
        patch(split, MASK, backend="reference")
    offloaded = cpu_offload(tiny_model("llama"), execution_device="cpu")
    with pytest.raises(ValueError, match="with offloaded weights"):
        patch(offloaded, MASK, backend="reference")

"""PEFT LoRA beside keystone training (keystone_kernels.lora): the sft mode, composition with a PeftModel,
and KeystoneAdamW refusing frozen keystone tensors. Tiny models, no downloads."""

import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer, write_sft_files

from keystone_kernels import (
    KeystoneAdamW,
    KeystoneMask,
    keystone_parameters,
    load_adapter,
    merge,
    patch,
    save_adapter,
)
from keystone_kernels.nn.linear import KeystoneLinear
from keystone_kernels.sft import SFTConfig, train
from keystone_kernels.sft_data import SFTDataset

peft = pytest.importorskip("peft", reason="the LoRA baseline needs the optional peft package (pip install '.[peft]')")
from keystone_kernels.integrations import lora  # noqa: E402 (after the importorskip of peft)

ROWS = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}"}
        for a, b in [(1, 2), (30, 4), (7, 18), (12, 12), (5, 60), (9, 9)]]
MASK = {("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9], ("fwd_down", 0, None): [3]}
IDS = [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 3, 4, 12, 40, 41]]),
       torch.tensor([[7, 7, 8, 2, 30, 31]])]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _lm_head_lora(model, seed=3):
    """LoRA r=4 on lm_head only; B set to random values so that no gradient or update starts at zero."""
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return pm


def test_lora_mode_trains_the_adapters_only_and_saves_a_peft_adapter(tok, tmp_path):
    model = tiny_model("llama")
    base = {n: p.clone() for n, p in model.named_parameters()}
    result = train(model, tok, None, SFTDataset(ROWS, tok),
                   SFTConfig(mode="lora", lora_r=4, steps=10, lr=1e-2, batch_size=3), tmp_path / "out", progress=False)
    assert min(result.losses[-3:]) < result.losses[0]
    # r (in + out) per projection: q, o 48x48; k, v 24x48; gate, up 72x48; down 48x72 -> 2784 per layer, 2 layers
    assert result.trainable_parameters == 2 * 4 * (2 * 96 + 2 * 72 + 3 * 120) == 5568
    n_tensors = 2 * 7 * 2  # A and B of 7 projections in 2 layers: exp_avg + exp_avg_sq fp32, a 4-byte step each
    assert result.optimizer_state_bytes == 2 * 4 * result.trainable_parameters + 4 * n_tensors
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name  # the base model is untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    # the saved folder is a standard PEFT adapter: a fresh base + PeftModel.from_pretrained gives the same model
    fresh = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "out" / "lora_adapter"))
    x = IDS[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_lora_checkpoint_resume_ends_with_the_same_adapter(tok, tmp_path):
    ds = SFTDataset(ROWS, tok)
    config = SFTConfig(mode="lora", lora_r=2, steps=6, lr=5e-3, batch_size=2, save_every=3)
    straight = tiny_model("llama")
    train(straight, tok, None, ds, config, tmp_path / "a", progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, _loss):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_model("llama"), tok, None, ds, config, tmp_path / "b", progress=False, on_step=stop)
    resumed = tiny_model("llama")
    result = train(resumed, tok, None, ds, config, tmp_path / "b", resume=True, progress=False)
    assert result.resumed_from == 3 and len(result.losses) == 6
    a, b = _lora_state(straight), _lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):
        SFTConfig(mode="lora", lora_r=0)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lora.lora_config(tiny_model("llama"), r=0)
    with pytest.raises(ValueError, match="already a PeftModel"):
        lora.add_lora(lora.add_lora(tiny_model("llama"), r=2))
    with pytest.raises(ValueError, match="LoRA on the same decoder projections as keystone"):
        lora.add_lora(patch(tiny_model("llama"), KeystoneMask(MASK), backend="reference"))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora.save_lora(tiny_model("llama"), "unused")


def test_missing_peft_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError,
                       match=r"optional package peft; install it with: pip install 'keystone-kernels\[peft\]'"):
        lora.add_lora(tiny_model("llama"))
    assert not lora.is_peft_model(tiny_model("llama"))


def test_patching_a_peft_model_steps_keystone_and_lora_like_masked_dense_adamw():
    """Keystone on the projections + LoRA on lm_head, one KeystoneAdamW, against the reference: torch AdamW over
    the full projection weights with non-keystone gradients zeroed (the paper's training) plus the same LoRA."""
    mask = KeystoneMask(MASK)
    pm = _lm_head_lora(tiny_model("llama"))
    ref = _lm_head_lora(tiny_model("llama"))
    assert patch(pm, mask, frozen_dtype=torch.float32, backend="reference") is pm
    indices = mask.weight_indices(tiny_model("llama"))
    opt = KeystoneAdamW(lora.composed_param_groups(pm, adapter_lr=3e-2), lr=1e-2, weight_decay=0.0, backend="reference")
    assert [len(g["params"]) for g in opt.param_groups] == [len(keystone_parameters(pm)), 2]

    ref_base = ref.get_base_model()
    proj, masks = [], []
    for path, ind in indices.items():
        w = ref_base.get_submodule(path).weight
        w.requires_grad_(True)
        m = torch.zeros_like(w, dtype=torch.bool)
        m[ind.rows, :] = True
        m[:, ind.cols] = True
        proj.append(w)
        masks.append(m)
    ref_lora = [p for n, p in ref.named_parameters() if "lora_" in n]
    ref_opt = torch.optim.AdamW([{"params": proj, "lr": 1e-2}, {"params": ref_lora, "lr": 3e-2}], weight_decay=0.0,
                                foreach=False)
    lora_before = _lora_state(pm)
    for x in IDS:
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        ref(input_ids=x, labels=x).loss.backward()
        with torch.no_grad():
            for w, m in zip(proj, masks):
                w.grad.mul_(m)
        ref_opt.step()
        ref_opt.zero_grad()

    base = pm.get_base_model()
    for path, w in zip(indices, proj):
        module = base.get_submodule(path)
        assert isinstance(module, KeystoneLinear)
        torch.testing.assert_close(module.merged_weight()[0], w.detach(), rtol=1e-4, atol=1e-6)
        assert not torch.equal(module.merged_weight()[0], tiny_model("llama").get_submodule(path).weight)  # it trained
    got, want = _lora_state(pm), _lora_state(ref)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
        assert not torch.equal(got[name], lora_before[name]), name


def test_patched_peft_model_saves_loads_and_merges_through_its_base(tmp_path):
    mask = KeystoneMask(MASK)
    pm = patch(_lm_head_lora(tiny_model("llama")), mask, backend="reference")
    opt = KeystoneAdamW(lora.composed_param_groups(pm), lr=1e-2, backend="reference")
    for x in IDS[:2]:
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(pm, tmp_path / "ks.safetensors")
    fresh = load_adapter(tiny_model("llama"), tmp_path / "ks.safetensors")  # keys are the base model's paths
    for a, b in zip(keystone_parameters(fresh), keystone_parameters(pm)):
        assert torch.equal(a, b)
    assert load_adapter(_lm_head_lora(tiny_model("llama")), tmp_path / "ks.safetensors").get_base_model()._keystone
    lora_trained = _lora_state(pm)
    assert merge(pm) is pm
    base = pm.get_base_model()
    assert type(base.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert all(p.requires_grad == ("lora_" in n) for n, p in pm.named_parameters())  # PEFT's trainable set restored
    assert all(torch.equal(v, _lora_state(pm)[k]) for k, v in lora_trained.items())


def test_peft_layers_on_a_decoder_projection_are_refused_and_the_model_is_untouched():
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    before = {n: (p.clone(), p.requires_grad) for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match=r"PEFT lora layer wraps the decoder projection "
                                         r"model\.layers\.0\.self_attn\.q_proj "
                                         r"\(and 1 more\).*Supported: PEFT adapters on modules other than"):
        patch(pm, KeystoneMask(MASK), backend="reference")
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in pm.named_parameters())
    assert not any(isinstance(m, KeystoneLinear) for m in pm.modules())


def test_keystone_adamw_refuses_tensors_frozen_before_the_first_step():
    """get_peft_model on a patched model freezes the keystone tensors: the first step raises, nothing changes."""
    model = patch(tiny_model("llama"), KeystoneMask(MASK), backend="reference")
    params = keystone_parameters(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    opt = KeystoneAdamW(params, lr=1e-2, backend="reference")
    pm(input_ids=IDS[0], labels=IDS[0]).loss.backward()
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"keystone weight_rows tensor of shape \(2, 48\).*requires_grad=False.*"
                                         r"peft\.get_peft_model"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_keystone_adamw_refuses_tensors_frozen_after_the_layout_was_built(clear):
    """Frozen after the first step: caught by the zero-norm check (grads kept as arena views) or the no-grad check
    (``model.zero_grad()`` set them to None), with no per-tensor work on ordinary steps."""
    model = patch(tiny_model("llama"), KeystoneMask(MASK), backend="reference")
    pm = _lm_head_lora(model)
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, backend="reference")
    for p in keystone_parameters(model):
        p.requires_grad_(True)  # get_peft_model froze them; before the first step that is allowed to be undone
    init = [p.clone() for p in keystone_parameters(model)]
    pm(input_ids=IDS[0], labels=IDS[0]).loss.backward()
    opt.step()  # the layout is built here, and the tensors train
    first = [p.clone() for p in keystone_parameters(model)]
    assert all(not torch.equal(a, b) for a, b in zip(first, init))
    opt.zero_grad() if clear == "optimizer" else model.zero_grad(set_to_none=True)
    for p in keystone_parameters(model):
        p.requires_grad_(False)
    pm(input_ids=IDS[1], labels=IDS[1]).loss.backward()  # only the LoRA tensors get gradients now
    with pytest.raises(ValueError, match="requires_grad=False"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(keystone_parameters(model), first))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Liger-Kernel runs Triton kernels)")
def test_liger_kernel_then_patch_trains_like_without_liger():
    """apply_liger_kernel_to_llama() then patch: the loss (Liger's fused linear cross-entropy) matches the plain
    model's, and keystone training lowers it. GPU only; untested until a GPU run."""
    liger = pytest.importorskip("liger_kernel.transformers", reason="needs liger-kernel (pip install liger-kernel)")
    import transformers as tf

    mask = KeystoneMask(MASK)
    plain = tiny_model("llama")
    plain_state = {k: v.clone() for k, v in plain.state_dict().items()}
    plain = patch(plain.cuda(), mask, frozen_dtype=torch.float32)
    llama = tf.models.llama.modeling_llama
    saved = (llama.LlamaForCausalLM.forward, llama.LlamaMLP, llama.LlamaRMSNorm, llama.apply_rotary_pos_emb)
    try:
        liger.apply_liger_kernel_to_llama()
        model = tiny_model("llama")
        model.load_state_dict(plain_state)  # the same weights whatever order Liger's modules initialise in
        model = patch(model.cuda(), mask, frozen_dtype=torch.float32)
        assert type(model.model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"
        x = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=x, labels=x).loss, plain(input_ids=x, labels=x).loss,
                                       rtol=1e-4, atol=1e-4)
        opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2)
        losses = []
        for _ in range(8):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        assert losses[-1] < losses[0]
    finally:  # undo the module-level monkey patches for the tests that follow
        llama.LlamaForCausalLM.forward, llama.LlamaMLP, llama.LlamaRMSNorm, llama.apply_rotary_pos_emb = saved


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_llama_lora")
    tiny_model("llama").save_pretrained(path)
    tok.save_pretrained(path)
    return write_sft_files(path)


def test_cli_sft_lora_and_compare_with_lora(tiny_dir, tmp_path, capsys):
    from keystone_kernels.cli import main

    data = ["--model", str(tiny_dir), "--data", str(tiny_dir / "train.jsonl"), "--eval", str(tiny_dir / "eval.jsonl")]
    out = tmp_path / "run"
    assert main(["sft", *data, "--mode", "lora", "--lora-r", "2", "--steps", "3", "--batch-size", "2",
                 "--output", str(out), "--merge"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "lora" and metrics["trainable_parameters"] == 2 * 2 * (2 * 96 + 2 * 72 + 3 * 120)
    assert ((out / "lora_adapter" / "adapter_config.json").is_file()
            and not (out / "keystone_adapter.safetensors").exists())
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["model_type"] == "llama" and "before" in capsys.readouterr().out
    cmp, mask = tmp_path / "cmp", tmp_path / "mask.json"
    KeystoneMask(MASK).to_json(mask)
    assert main(["compare", *data, "--mask", str(mask), "--steps", "2", "--batch-size", "2", "--lrs-keystone", "1e-3",
                 "--lrs-random", "--lrs-lora", "1e-3", "--lora-r", "2", "--lrs-full", "1e-5",
                 "--output", str(cmp)]) == 0
    report = json.loads((cmp / "compare.json").read_text())
    assert [r["mode"] for r in report["runs"]] == ["keystone", "lora", "full"] and report["lora_r"] == 2
    assert [r["mode"] for r in report["summary"]] == ["keystone", "lora", "full"]
    assert "opt state MiB" in capsys.readouterr().out

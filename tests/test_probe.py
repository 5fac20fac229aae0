"""The probe leaves the model's computation alone under every attention implementation.

Before the fix, the probe's private attention name made ``masking_utils`` build no mask, and eager
attention without a mask attends both ways (scores off by up to 95% from layer 1 on).
"""

import pytest
import torch
from tiny import FAMILY_CONFIGS, PROMPTS, tiny_model, tiny_tokenizer

from keystone_kernels import arch
from keystone_kernels.analysis.discovery import _right_padded, collect_activations
from keystone_kernels.analysis.probe import Probe

IMPLEMENTATIONS = ["eager", "sdpa", "flex_attention"]
# flex attention compiles its block mask once per shape: slow on the CPU, so two families only
FLEX_FAMILIES = {"llama", "qwen3_moe"}
CASES = [(f, i) for f in sorted(FAMILY_CONFIGS) for i in IMPLEMENTATIONS if i != "flex_attention" or f in FLEX_FAMILIES]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(family, impl):
    model = tiny_model(family)
    try:
        model.set_attn_implementation(impl)
    except (ValueError, ImportError) as err:  # a family without flex support says so
        pytest.skip(f"{family} does not run {impl}: {err}")
    assert model.config._attn_implementation == impl
    return model


def _batch(tok):
    """Right-padded batch of different lengths: the mask must hide padding and the future."""
    seqs = [tok(p)["input_ids"] for p in PROMPTS["a"][:3]]
    return _right_padded(seqs, tok.pad_token_id, "cpu")


def _hooked_means(model, ids, mask):
    """attn_o (o_proj input) and, outside MoE layers, fwd_up / fwd_down, by plain module hooks: no probe."""
    fam = arch.family_for(model)
    sums, handles = {}, []
    w = mask.float()

    def keep(key, act):
        sums[key] = torch.einsum("bsn,bs->n", act.detach().abs().float(), w) / w.sum()

    for i, layer in enumerate(arch.layers_of(model, fam)):
        o = layer.get_submodule(fam.o)
        handles.append(o.register_forward_pre_hook(lambda m, a, i=i: keep(("attn_o", i, None), a[0])))
        if arch._experts_module(model, fam, i) is None:
            up = layer.get_submodule(fam.up)
            handles.append(up.register_forward_hook(lambda m, a, out, i=i: keep(("fwd_up", i, None), out)))
            handles.append(layer.get_submodule(fam.down).register_forward_pre_hook(
                lambda m, a, i=i: keep(("fwd_down", i, None), a[0])))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("family, impl", CASES)
def test_outputs_and_scores_equal_a_run_without_the_probe(family, impl, tok):
    model = _model(family, impl)
    ids, mask = _batch(tok)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        fam = arch.family_for(model)
        with Probe(model, fam, arch.neuron_keys(model, fam, "all"), rows=len(ids)) as probe:
            probe.recorder.weights, probe.recorder.batch_rows = mask.float(), torch.arange(len(ids))
            probed = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(probed[real], plain[real], rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == impl
    reference = _hooked_means(model, ids, mask)
    scores = collect_activations(model, tok, PROMPTS["a"][:3], types="paper", positions="all", batch_size=3)
    for key, want in reference.items():
        torch.testing.assert_close(scores[key], want, rtol=1e-4, atol=1e-6, msg=f"{family} {impl} {key}")


def test_eager_without_the_mask_fix_would_differ(tok):
    """The check above has teeth: eager attention run without its mask changes attn_o of layer 1."""
    model = _model("llama", "eager")
    ids, mask = _batch(tok)
    good = _hooked_means(model, ids, mask)[("attn_o", 1, None)]
    from transformers.masking_utils import AttentionMaskInterface

    saved = AttentionMaskInterface._global_mapping.pop("eager")  # what an unknown name got before the fix
    try:
        bad = _hooked_means(model, ids, mask)[("attn_o", 1, None)]
    finally:
        AttentionMaskInterface._global_mapping["eager"] = saved
    assert not torch.allclose(bad, good, rtol=1e-3, atol=1e-5)

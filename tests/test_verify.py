"""ablate / scale: exactly the owned weights change, everything is restored bit-exactly; scorers."""

import math

import pytest
import torch
from tiny import PROMPTS, tiny_model, tiny_tokenizer

from keystone_kernels import arch
from keystone_kernels.analysis.verify import (
    ablate,
    answer_matches,
    collapse_table,
    evaluate_perplexity,
    generate_answers,
    scale,
    score_exact_match,
    score_multiple_choice,
)
from keystone_kernels.mask import KeystoneMask

MASKS = {
    # o_proj gets a row (res_attn 1) and columns (attn_o): the shared element must be handled once
    "llama": {("attn_q", 0, None): [0, 5], ("attn_k", 1, None): [3, 40], ("attn_o", 1, None): [1, 7, 30],
              ("res_attn", 1, None): [1], ("fwd_up", 0, None): [2], ("fwd_down", 1, None): [0, 71]},
    "gpt2": {("attn_q", 0, None): [4], ("attn_v", 0, None): [4], ("attn_o", 1, None): [9],
             ("fwd_down", 0, None): [100]},
    "qwen3_moe": {("fwd_up", 0, 2): [1, 39], ("fwd_down", 0, 0): [5], ("res_mlp", 0, 0): [3], ("fwd_up", 1, None): [6]},
}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_identical(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def _owned(shape, ind):
    owned = torch.zeros(shape, dtype=torch.bool)
    owned[ind.rows] = True
    cols = torch.zeros(shape, dtype=torch.bool)
    cols[:, ind.cols] = True
    return owned | cols


@pytest.mark.parametrize("family", sorted(MASKS))
@pytest.mark.parametrize("factor", [0.0, -1.75])
def test_scale_touches_exactly_the_owned_weights_once(family, factor):
    model = tiny_model(family)
    mask = KeystoneMask(MASKS[family])
    snap = {k: arch.weight_2d(model, k)[0].detach().clone() for k in mask.weight_indices(model)}
    before = _snapshot(model)
    with scale(model, mask, factor):
        for key, ind in mask.weight_indices(model).items():
            w = arch.weight_2d(model, key)[0]
            owned = _owned(w.shape, ind)
            torch.testing.assert_close(w[owned], snap[key][owned] * factor, rtol=0, atol=0)
            assert torch.equal(w[~owned], snap[key][~owned])
        changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
        assert changed == mask.num_parameters(model, include_bias=False)
    _assert_bit_identical(model, before)


def test_ablation_changes_the_output_and_restores_after_an_exception():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = torch.tensor([tok("restore me")["input_ids"]])
    base = model(input_ids=ids).logits
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with ablate(model, KeystoneMask(MASKS["llama"])):
            assert not torch.allclose(model(input_ids=ids).logits, base)
            raise RuntimeError("inside")
    _assert_bit_identical(model, before)
    assert torch.equal(model(input_ids=ids).logits, base)


def test_bad_mask_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = _snapshot(model)
    bad = KeystoneMask({("attn_q", 0, None): [1], ("fwd_up", 1, None): [10_000]})
    with pytest.raises(ValueError, match=r"fwd_up\[1\]: index 10000 out of range"):
        with ablate(model, bad):
            pass
    _assert_bit_identical(model, before)


def test_perplexity_matches_per_text_hf_loss():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["a short one", "a somewhat longer line of text here", "mid length text"]
    nll = tokens = 0.0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert evaluate_perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_perplexity(model, tok, "not a list")


@pytest.mark.parametrize(
    "generated, answer, ok",
    [("42", "42", True), (" The answer is 42.", "42", True),
     ("23 + 19 = 42", "42", True), ("23 + 19 = 41", "42", False),
     ("The answer is 42, not 43", "42", True), ("42 or 41", "42", False), ("1,000 apples", "1000", True),
     ("12 - 19 = -7", "-7", True), ("42\nand later 43", "42", True), ("Paris, of course", "paris", True),
     ("It is Paris.", "Paris", True), ("Parisian food", "Paris", False), ("Rome\nParis", "Paris", False),
     ("Carbon dioxide, CO2", "carbon dioxide", True), ("", "3", False)],
)
def test_answer_matching(generated, answer, ok):
    assert answer_matches(generated, answer) is ok


def test_exact_match_uses_greedy_generation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["2+2=", "capital?", "hi"]
    gens = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(gens) == 3 and gens == generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=1)
    items = [{"prompt": p, "answer": g} for p, g in zip(prompts, gens)]
    items[1]["answer"] = "zq" + gens[1]  # cannot be a prefix of what was generated
    assert score_exact_match(model, tok, items, max_new_tokens=4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="item 0 needs 'prompt' and 'answer'"):
        score_exact_match(model, tok, [{"question": "x"}])


def test_multiple_choice_picks_the_most_likely_choice():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    q, choices = "pick one:", ["alpha", "beta", "gamma"]
    lls = []
    for c in choices:
        q_ids, c_ids = tok(q)["input_ids"], tok(" " + c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([q_ids + c_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        lls.append(float(sum(logp[len(q_ids) - 1 + i, t] for i, t in enumerate(c_ids))))
    best = max(range(3), key=lls.__getitem__)
    items = [{"question": q, "choices": choices, "answer": best},
             {"question": q, "choices": choices, "answer": (best + 1) % 3}]
    assert score_multiple_choice(model, tok, items) == 0.5
    with pytest.raises(ValueError, match="item 0 needs 'choices'"):
        score_multiple_choice(model, tok, [{"question": q, "choices": choices, "answer": 3}])


def test_collapse_table_rows():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    mask = KeystoneMask(MASKS["llama"])
    rows = collapse_table(model, tok, mask, texts=PROMPTS["a"], seeds=[0, 1])
    assert [r.condition for r in rows] == ["base", "keystone ablated", "random ablated (seed 0)",
                                           "random ablated (seed 1)"]
    assert rows[0].ratio == 1.0 and all(r.neurons == mask.num_neurons for r in rows[1:])
    # the fair control: as many weights as the keystone mask (attn_k 3 and 40 read different k rows here)
    assert all(r.weights == mask.num_parameters(model, include_bias=False) > 0 for r in rows[1:])
    assert all(r.ratio == pytest.approx(r.perplexity / rows[0].perplexity) for r in rows)
    assert rows[1].perplexity != rows[0].perplexity

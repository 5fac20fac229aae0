"""Probes on every family, padding handling, an independent q/k/v check, selection and intersection."""

import itertools
import math

import pytest
import torch
from tiny import FAMILY_CONFIGS, PROMPTS, tiny_model, tiny_tokenizer

from keystone_kernels import arch
from keystone_kernels.analysis.discovery import collect_activations, find_keystone, select_top, use_chat_template
from keystone_kernels.mask import KeystoneMask


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_probe_covers_every_neuron_and_leaves_the_model_as_it_was(family, tok):
    model = tiny_model(family)
    ids = torch.tensor([tok("probe check")["input_ids"]])
    before = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    scores = collect_activations(model, tok, PROMPTS["a"], types="all", batch_size=3)
    keys = arch.neuron_keys(model, arch.family_for(model), "all")
    assert scores.keys() == keys.keys()
    for key, s in scores.items():
        assert s.shape == (keys[key].size,) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all()
        if key[2] is None:  # dense neurons all see every prompt; an expert may see no token
            assert (s > 0).any(), key
    assert _hook_count(model) == 0 and model.config._attn_implementation == impl
    assert not any("_keystone_attn_impl" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_padding_is_masked_out(family, positions, tok):
    model = tiny_model(family)
    prompts = PROMPTS["a"] + PROMPTS["b"]  # different lengths: batching pads
    one_by_one = collect_activations(model, tok, prompts, types="all", positions=positions, batch_size=1)
    batched = collect_activations(model, tok, prompts, types="all", positions=positions, batch_size=4)
    for key in one_by_one:
        torch.testing.assert_close(batched[key], one_by_one[key], rtol=1e-4, atol=1e-5)


def test_attention_values_match_an_independent_computation(tok):
    """q/k after RoPE and v after repeat_kv, recomputed from the layer input with the model's own rotary."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    model = tiny_model("qwen3")  # GQA (2 groups) with explicit head_dim 16
    dims = arch.dims_of(model)
    prompts = PROMPTS["a"]
    scores = collect_activations(model, tok, prompts, types="paper", positions="all", batch_size=2)
    attn = model.model.layers[1].self_attn
    inputs = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    sums = {t: torch.zeros(dims.num_heads * dims.head_dim) for t in ("attn_q", "attn_k", "attn_v")}
    count = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            inputs.clear()
            model(input_ids=ids)
            x = inputs[0]
            shape = (1, ids.shape[1], -1, dims.head_dim)
            q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            j = torch.arange(dims.num_heads * dims.head_dim)
            kv_j = dims.kv_row(j)  # channel j of query space reads kv channel kv(j)
            def flat(t, n=ids.shape[1]):
                return t.transpose(1, 2).reshape(n, -1).abs()

            sums["attn_q"] += flat(q).sum(0)
            sums["attn_k"] += flat(k)[:, kv_j].sum(0)
            sums["attn_v"] += flat(v)[:, kv_j].sum(0)
            count += ids.shape[1]
    handle.remove()
    for t in sums:
        torch.testing.assert_close(scores[(t, 1, None)], sums[t] / count, rtol=1e-4, atol=1e-6)


def _brute_force(scores, fraction, selection, rounding="floor"):
    keys = sorted(scores, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))
    ceil = rounding == "ceil" or (rounding == "paper" and selection == "global")  # the paper: ceil for global only

    def count(n):
        return max(1, math.ceil(n * fraction) if ceil else int(n * fraction))

    def top(values, k):
        return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])

    if selection == "per_layer":
        return {k: top(scores[k].tolist(), count(len(scores[k]))) for k in keys}
    pools = [keys] if selection == "global" else [[k for k in keys if k[0] == t] for t in sorted({k[0] for k in keys})]
    out = {}
    for pool in pools:
        flat = [(float(v), key, i) for key in pool for i, v in enumerate(scores[key].tolist())]
        k = count(len(flat))
        chosen = sorted(range(len(flat)), key=lambda n: (-flat[n][0], n))[:k]
        for key in pool:
            out[key] = sorted(flat[n][2] for n in chosen if flat[n][1] == key)
    return out


@pytest.mark.parametrize("rounding", ["floor", "ceil", "paper"])
@pytest.mark.parametrize("selection", ["per_layer", "global_per_type", "global"])
@pytest.mark.parametrize("fraction", [0.003, 0.07, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_matches_brute_force(selection, fraction, seed, rounding):
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for ntype, layer in itertools.product(["attn_q", "fwd_up", "attn_o"], range(3)):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        scores[(ntype, layer, None)] = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
    scores[("fwd_up", 3, 1)] = torch.rand(17, generator=gen)
    got = select_top(scores, fraction, selection, rounding)
    want = _brute_force(scores, fraction, selection, rounding)
    assert {k: v.tolist() for k, v in got.items() if len(v)} == {k: v for k, v in want.items() if v}


def test_intersection_and_iou_arithmetic(tok):
    model = tiny_model("llama")
    found = find_keystone(model, tok, PROMPTS, top_fraction=0.25, progress=False)

    def as_set(m):
        return {(k, i) for k, v in m.neurons.items() for i in v.tolist()}

    sets = {name: as_set(m) for name, m in found.group_masks.items()}
    inter = set.intersection(*sets.values())
    union = set.union(*sets.values())
    assert as_set(found.mask) == inter and found.mask.num_neurons == len(inter)
    assert found.iou == pytest.approx(len(inter) / len(union))
    for a, b in itertools.combinations(sets, 2):
        assert found.pairwise_iou[f"{a} & {b}"] == pytest.approx(len(sets[a] & sets[b]) / len(sets[a] | sets[b]))
    per_group_k = sum(max(1, int(s.size * 0.25))
                      for s in arch.neuron_keys(model, arch.family_for(model), None).values())
    assert all(m.num_neurons == per_group_k for m in found.group_masks.values())
    meta = found.mask.metadata
    assert meta["selection"] == "per_layer" and meta["groups"] == {k: len(v) for k, v in PROMPTS.items()}
    assert found.total_neurons == meta["total_neurons"]
    assert found.mask.random_like(0, match="neurons").counts() == found.mask.counts()
    first = next(iter(found.group_masks.values()))
    assert found.overlap.iou == found.iou and found.overlap_vs_single == pytest.approx(len(inter) / first.num_neurons)
    assert meta["overlap_vs_single"] == found.overlap_vs_single
    assert set(meta["overlap_by_type"]) == set(arch.PAPER_TYPES)
    assert meta["chat"] is False and meta["group_pool"] == "tokens" and meta["recorded_tokens"]["c"] == 2  # last token


def test_chat_and_bf16(tok):
    model = tiny_model("llama", dtype=torch.bfloat16)
    found = find_keystone(model, tok, PROMPTS, top_fraction=0.1, chat=True, positions="all", types="residual",
                          progress=False)
    assert {k[0] for k in found.mask.neurons} <= {"res_attn", "res_mlp"}
    assert all(torch.isfinite(s).all() for g in found.scores.values() for s in g.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts={}), "non-empty dict"),
        (dict(prompts={"a": []}), "prompt group 'a' must be a non-empty list"),
        (dict(prompts={"a": "just a string"}), "prompt group 'a'"),
        (dict(prompts={"a": ["ok", ""]}), "prompt group 'a'"),
        (dict(selection="topk"), "selection must be one of"),
        (dict(top_fraction=0.0), r"top_fraction must be in \(0, 1\]"),
        (dict(top_fraction=1.5), r"top_fraction must be in \(0, 1\]"),
        (dict(positions="first"), "positions must be one of"),
        (dict(group_pool="groups"), "group_pool must be one of"),
        (dict(rounding="round"), "rounding must be one of"),
        (dict(positions="generate", max_new_tokens=-1), "max_new_tokens must be a positive integer"),
        (dict(types=["attn_q", "mlp_gate"]), "unknown neuron type 'mlp_gate'"),
    ],
)
def test_bad_arguments(kwargs, message, tok):
    model = tiny_model("llama")
    kwargs.setdefault("prompts", PROMPTS)
    with pytest.raises(ValueError, match=message):
        find_keystone(model, tok, progress=False, **kwargs)


def test_chat_without_template_is_refused(tok):
    plain = tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        find_keystone(tiny_model("llama"), plain, PROMPTS, chat=True, progress=False)


def test_chat_auto_is_on_for_generate_only_and_only_with_a_template(tok):
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert use_chat_template(tok, None, "generate") and not use_chat_template(plain, None, "generate")
    assert not use_chat_template(tok, None, "last") and not use_chat_template(tok, None, "all")
    assert use_chat_template(tok, True, "last") and not use_chat_template(tok, False, "generate")


def test_group_pool_prompts_intersects_each_prompts_own_selection(tok):
    model = tiny_model("qwen2")
    prompts = {"a": PROMPTS["a"][:3], "b": PROMPTS["b"]}
    found = find_keystone(model, tok, prompts, top_fraction=0.2, group_pool="prompts", progress=False)
    for name, group in prompts.items():
        own = [KeystoneMask(select_top(collect_activations(model, tok, [p]), 0.2)) for p in group]
        want = own[0]
        for m in own[1:]:
            want = want & m
        assert found.group_masks[name] == want
    assert found.mask == found.group_masks["a"] & found.group_masks["b"]
    assert found.mask.metadata["group_pool"] == "prompts"
    pooled = find_keystone(model, tok, prompts, top_fraction=0.2, progress=False)  # tokens: one selection per group
    assert all(m.num_neurons > found.group_masks[n].num_neurons for n, m in pooled.group_masks.items())


def test_find_with_generate_records_the_models_answers(tok):
    model = tiny_model("mistral")
    prompts = {"a": PROMPTS["a"][:2], "c": PROMPTS["c"]}
    found = find_keystone(model, tok, prompts, top_fraction=0.1, positions="generate", max_new_tokens=5, batch_size=2,
                          progress=False)
    meta = found.mask.metadata
    assert meta["positions"] == "generate" and meta["max_new_tokens"] == 5 and meta["chat"] is True
    assert all(len(r) == 2 for r in found.responses.values())
    assert 2 <= found.recorded_tokens["a"] <= 2 * 5 and meta["recorded_tokens"] == found.recorded_tokens
    assert 0 < found.mask.num_neurons and 0 < found.iou <= 1

"""KeystoneMask: reference JSON layout -> weight rows/columns, I/O, set algebra, validation errors."""

import json
import os

import pytest
import torch
from tiny import tiny_model

from keystone_kernels import arch
from keystone_kernels.mask import KeystoneMask


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3")  # 4 heads, 2 kv heads, head_dim 16 (not hidden // heads = 12)


@pytest.fixture(scope="module")
def qwen3_moe():
    return tiny_model("qwen3_moe")  # layer 0: 4 experts, moe_intermediate 40; layer 1: dense (mlp_only_layers)


def _as_lists(indices):
    return {k: (v.rows.tolist(), v.cols.tolist()) for k, v in indices.items()}


def test_reference_layout_maps_to_hand_computed_rows_and_columns(qwen3):
    # Written by hand from docs/design.md section 1: kv(j) = ((j // 16) // 2) * 16 + j % 16 for 4 heads / 2 kv heads.
    mask = KeystoneMask.from_dict({
        "attn_q": {"0": [50, 3]},
        "attn_k": {"0": [37, 5, 21]},   # 37 -> head 2 -> kv 1 -> 21; 5 -> 5; 21 -> head 1 -> kv 0 -> 5
        "attn_v": {"1": [10, 63]},      # 10 -> 10; 63 -> head 3 -> kv 1 -> 31
        "attn_o": {"1": [7]},
        "fwd_up": {"0": [3]},
        "fwd_down": {"1": [5, 71]},
        "res_attn": {"1": [2]},         # residual: row 2 of o_proj, shares o_proj with attn_o column 7
    })
    got = _as_lists(mask.weight_indices(qwen3))
    assert got == {
        "model.layers.0.self_attn.q_proj": ([3, 50], []),
        "model.layers.0.self_attn.k_proj": ([5, 21], []),
        "model.layers.1.self_attn.v_proj": ([10, 31], []),
        "model.layers.1.self_attn.o_proj": ([2], [7]),
        "model.layers.0.mlp.up_proj": ([3], []),
        "model.layers.1.mlp.down_proj": ([], [5, 71]),
    }
    # ownership rule: the o_proj row owns its full row, the column owns the rest of its entries
    o_out, o_in = qwen3.model.layers[1].self_attn.o_proj.weight.shape
    up_in = qwen3.model.layers[0].mlp.up_proj.weight.shape[1]
    down_out = qwen3.model.layers[1].mlp.down_proj.weight.shape[0]
    q_in = qwen3.model.layers[0].self_attn.q_proj.weight.shape[1]
    expected = 2 * q_in + 2 * q_in + 2 * q_in + (1 * o_in + (o_out - 1) * 1) + up_in + 2 * down_out
    assert mask.num_parameters(qwen3) == expected


def test_moe_expert_keys_map_to_expert_slices(qwen3_moe):
    mask = KeystoneMask.from_dict(
        {"fwd_up": {"0_expert_3": [4], "1": [5]}, "fwd_down": {"0_expert_1": [39]}, "res_mlp": {"0_expert_0": [1]}}
    )
    got = _as_lists(mask.weight_indices(qwen3_moe))
    assert got == {
        "model.layers.0.mlp.experts.gate_up_proj.3": ([40 + 4], []),  # gate_up rows are [gate (40); up (40)]
        "model.layers.0.mlp.experts.down_proj.1": ([], [39]),
        "model.layers.0.mlp.experts.down_proj.0": ([1], []),
        "model.layers.1.mlp.up_proj": ([5], []),
    }
    w, _ = arch.weight_2d(qwen3_moe, "model.layers.0.mlp.experts.gate_up_proj.3")
    assert w.data_ptr() == qwen3_moe.model.layers[0].mlp.experts.gate_up_proj[3].data_ptr()


def test_gpt2_fused_qkv_and_conv1d_transpose():
    model = tiny_model("gpt2")  # n_embd 48: c_attn output is [q 48 | k 48 | v 48]
    mask = KeystoneMask.from_dict({"attn_q": {"0": [1]}, "attn_k": {"0": [2]}, "attn_v": {"0": [3]},
                                   "attn_o": {"1": [4]}})
    got = _as_lists(mask.weight_indices(model))
    assert got == {"transformer.h.0.attn.c_attn": ([1, 50, 99], []), "transformer.h.1.attn.c_proj": ([], [4])}
    w, bias = arch.weight_2d(model, "transformer.h.0.attn.c_attn")
    conv = model.transformer.h[0].attn.c_attn
    assert w.shape == (144, 48) and torch.equal(w, conv.weight.t()) and bias is conv.bias
    # biases of owned rows count as parameters
    assert mask.num_parameters(model) == 3 * 48 + 3 + 48 * 1


def test_json_round_trip_keeps_neurons_metadata_and_reference_layout(tmp_path, qwen3_moe):
    mask = KeystoneMask({("attn_q", 1, None): [9, 2], ("fwd_up", 0, 3): [7],
                         ("res_attn", 0, None): torch.tensor([4, 0])},
                        {"model": "tiny", "iou": 0.5})
    path = tmp_path / "m.json"
    mask.to_json(path)
    raw = json.loads(path.read_text())
    assert raw["attn_q"] == {"1": [2, 9]} and raw["fwd_up"] == {"0_expert_3": [7]} and raw["__metadata__"]["iou"] == 0.5
    back = KeystoneMask.from_json(path)
    assert back == mask and back.metadata == mask.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary files left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    KeystoneMask({("attn_q", 0, None): [1]}).to_json(path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        KeystoneMask({("attn_q", 0, None): [2]}).to_json(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _random_mask(gen, n_keys=6):
    neurons = {}
    for i in range(n_keys):
        key = (arch.PAPER_TYPES[i % 6], int(torch.randint(0, 2, (1,), generator=gen)), None)
        size = int(torch.randint(0, 9, (1,), generator=gen))
        neurons[key] = torch.randperm(20, generator=gen)[:size]
    return KeystoneMask(neurons)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_algebra_matches_python_sets(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _random_mask(gen), _random_mask(gen)

    def as_set(m):
        return {(k, i) for k, v in m.neurons.items() for i in v.tolist()}

    assert as_set(a | b) == as_set(a) | as_set(b)
    assert as_set(a & b) == as_set(a) & as_set(b)
    assert as_set(a - b) == as_set(a) - as_set(b)
    union = len(as_set(a) | as_set(b))
    assert a.iou(b) == pytest.approx(len(as_set(a) & as_set(b)) / union)
    assert (a | b).num_neurons == union


def test_random_like_keeps_counts_and_differs_by_seed(qwen3):
    mask = KeystoneMask({("attn_q", 0, None): [1, 2, 3], ("fwd_down", 1, None): [5], ("attn_k", 1, None): [0, 60]})
    r0, r0b, r1 = (mask.random_like(s, qwen3, match="neurons") for s in (0, 0, 1))
    assert r0.counts() == mask.counts() == r1.counts()
    assert r0 == r0b and r0 != r1
    sizes = mask.index_sizes(qwen3)
    assert all(int(v.max()) < sizes[k] for k, v in r1.neurons.items())
    r1.validate(qwen3)
    with pytest.raises(ValueError, match="needs the model"):
        mask.random_like(0, match="neurons")
    mask.metadata["sizes"] = {"attn_q/0": 64, "fwd_down/1": 72, "attn_k/1": 64}
    assert mask.random_like(3, match="neurons").counts() == mask.counts()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"attn_x": {"0": [1]}}, "unknown neuron type 'attn_x'"),
        ({"attn_q": {"zero": [1]}}, r"attn_q\['zero'\]: layer key"),
        ({"attn_q": {"0": [3, 1, 3]}}, r"attn_q\[0\]: duplicate index 3"),
        ({"attn_q": {"0": [-1]}}, r"attn_q\[0\]: negative index -1"),
        ({"attn_q": {"0": [1.5]}}, r"attn_q\[0\]: indices must be integers"),
        ({"attn_q": [1, 2]}, "must map layer keys"),
    ],
)
def test_bad_mask_data_is_refused_with_the_entry_named(data, message):
    with pytest.raises(ValueError, match=message):
        KeystoneMask.from_dict(data)


@pytest.mark.parametrize(
    "neurons, message",
    [
        ({("attn_q", 0, None): [64]}, r"attn_q\[0\]: index 64 out of range .*64 neurons"),
        ({("attn_k", 0, None): [64]}, r"attn_k\[0\]: index 64 out of range"),
        ({("fwd_up", 5, None): [1]}, "layer 5 out of range for a model with 2 layers"),
        ({("fwd_up", 0, 1): [1]}, "layer 0 has no experts module"),
    ],
)
def test_validation_against_a_model_names_the_entry(qwen3, neurons, message):
    with pytest.raises(ValueError, match=message):
        KeystoneMask(neurons).validate(qwen3)


def test_moe_validation_errors(qwen3_moe):
    with pytest.raises(ValueError, match=r"expert 4 out of range \(layer has 4 experts\)"):
        KeystoneMask({("fwd_up", 0, 4): [1]}).validate(qwen3_moe)
    with pytest.raises(ValueError, match="MoE layer: give an expert index"):
        KeystoneMask({("fwd_down", 0, None): [1]}).validate(qwen3_moe)


def test_unknown_architecture_lists_supported_ones_and_explicit_modules_work(qwen3):
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(ValueError, match=r"unsupported architecture model_type='oddformer'.*llama.*modules="):
        arch.family_for(Odd())
    qwen3.config.model_type, saved = "oddformer", qwen3.config.model_type
    try:
        fam = arch.family_for(qwen3, {"layers": "model.layers"})
        assert fam.q == "self_attn.q_proj"
        with pytest.raises(ValueError, match="unknown module keys"):
            arch.family_for(qwen3, {"query": "x"})
        with pytest.raises(ValueError, match="module 'model.layers.0.attn.q' not found"):
            KeystoneMask({("fwd_up", 0, None): [1]}).validate(qwen3, modules={"up": "attn.q"})
    finally:
        qwen3.config.model_type = saved


# ---------------------------------------------------------------------------------------- the paper's loaders
def _paper_read_neuron(path):
    """What the paper's train.py ``read_neuron`` does: every top-level value is a {layer: list} map and each
    list becomes a set (a non-list value is wrapped in a list first)."""
    raw = json.loads(path.read_text())
    out = {}
    for ntype, per_layer in raw.items():
        out[ntype] = {}
        for layer, idx in per_layer.items():
            out[ntype][layer] = set(idx if isinstance(idx, (list, tuple)) else [idx])
    return out


def _paper_trainable(model, activate):
    """What the paper's trainer ``mask_gradients`` leaves trainable in each projection weight: it looks up
    ``activate[type]`` for all six types (KeyError if one is missing) with the layer as a string key,
    maps attn_k / attn_v indices with head_dim = hidden // heads, and keeps rows (q, k, v, up) or columns
    (o, down) of the kept indices. Returns {module path: bool [out, in]}."""
    cfg = model.config
    head_dim, kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    projections = {"self_attn.q_proj": ("attn_q", 0), "self_attn.k_proj": ("attn_k", 0),
                   "self_attn.v_proj": ("attn_v", 0), "self_attn.o_proj": ("attn_o", 1),
                   "mlp.up_proj": ("fwd_up", 0), "mlp.down_proj": ("fwd_down", 1)}
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for name, (ntype, dim) in projections.items():
            idx = activate[ntype].get(str(layer), set())
            if ntype in ("attn_k", "attn_v"):
                idx = {((i // head_dim) // kv) * head_dim + i % head_dim for i in idx}
            weight = model.get_submodule(f"model.layers.{layer}.{name}").weight
            keep = torch.zeros(weight.shape, dtype=torch.bool)
            if dim == 0:
                keep[sorted(idx)] = True
            else:
                keep[:, sorted(idx)] = True
            out[f"model.layers.{layer}.{name}"] = keep
    return out


def test_paper_compatible_json_loads_in_the_paper_trainer_and_means_the_same_weights(tmp_path):
    model = tiny_model("llama")  # 4 heads, 2 kv heads, head_dim 12 = hidden // heads, as the paper assumes
    mask = KeystoneMask({("attn_q", 0, None): [3, 40], ("attn_k", 1, None): [5, 17, 29], ("attn_v", 0, None): [47],
                         ("attn_o", 1, None): [2], ("fwd_down", 0, None): [70, 1]},
                        {"model": "tiny", "groups": {"a": 2}, "pairwise_iou": {"a & b": 0.5}})
    old = tmp_path / "old.json"
    mask.to_json(old)
    with pytest.raises(TypeError, match="unhashable"):  # the bug this format fixes: __metadata__ holds dicts
        _paper_read_neuron(old)
    with pytest.raises(KeyError, match="fwd_up"):  # and a type the mask does not use is missing
        types = {t: {k: set(v) for k, v in d.items()} for t, d in mask.to_dict().items() if t != "__metadata__"}
        _paper_trainable(model, types)

    path = tmp_path / "paper.json"
    mask.to_json(path, paper_compatible=True)
    raw = json.loads(path.read_text())
    assert list(raw) == list(arch.PAPER_TYPES) and raw["fwd_up"] == {} and raw["attn_k"] == {"1": [5, 17, 29]}
    trainable = _paper_trainable(model, _paper_read_neuron(path))
    ours = mask.weight_indices(model)
    for name, keep in trainable.items():
        want = torch.zeros_like(keep)
        if name in ours:
            want[ours[name].rows] = True
            want[:, ours[name].cols] = True
        assert torch.equal(keep, want), name
    assert sum(int(k.sum()) for k in trainable.values()) == mask.num_parameters(model, include_bias=False)
    # the metadata went to the sidecar and comes back with the mask
    assert json.loads((tmp_path / "paper.meta.json").read_text())["groups"] == {"a": 2}
    back = KeystoneMask.from_json(path)
    assert back == mask and back.metadata == mask.metadata


def test_sidecar_is_removed_when_stale_and_residual_types_are_refused(tmp_path):
    path = tmp_path / "m.json"
    KeystoneMask({("attn_q", 0, None): [1]}, {"iou": 0.5}).to_json(path, paper_compatible=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.meta.json"]
    KeystoneMask({("attn_q", 0, None): [2]}).to_json(path, paper_compatible=True)  # no metadata: no sidecar
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and KeystoneMask.from_json(path).metadata == {}
    with pytest.raises(ValueError, match=r"only its six types .*'res_mlp'"):
        KeystoneMask({("res_mlp", 0, None): [1]}).to_json(tmp_path / "r.json", paper_compatible=True)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------- the fair random control
FAIR_MASKS = {
    "llama": {("attn_k", 0, None): [0, 12, 24, 25], ("attn_v", 1, None): [5, 17, 41], ("attn_q", 1, None): [7],
              ("attn_o", 0, None): [3, 4], ("res_attn", 0, None): [9], ("fwd_down", 1, None): [1, 2, 3]},
    "qwen3": {("attn_k", 1, None): [0, 16, 33, 63], ("attn_v", 0, None): [2, 18, 34, 50], ("fwd_up", 0, None): [4]},
    "gpt2": {("attn_q", 0, None): [1, 2], ("attn_k", 0, None): [3], ("attn_v", 0, None): [4, 5],
             ("attn_o", 1, None): [6]},
    "qwen3_moe": {("fwd_up", 0, 2): [1, 39], ("fwd_down", 0, 0): [5], ("res_mlp", 0, 0): [3],
                  ("attn_k", 1, None): [0, 16]},
}


def _shape(indices):
    return {k: (len(v.rows), len(v.cols)) for k, v in indices.items()}


@pytest.mark.parametrize("family", sorted(FAIR_MASKS))
def test_random_like_weights_keeps_rows_columns_and_parameters_per_projection(family):
    model = tiny_model(family)
    mask = KeystoneMask(FAIR_MASKS[family])
    want = _shape(mask.weight_indices(model))
    seen = []
    for seed in range(4):
        rnd = mask.random_like(seed, model)
        assert rnd.counts() == mask.counts() and rnd.metadata["random_match"] == "weights"
        assert _shape(rnd.weight_indices(model)) == want
        assert rnd.num_parameters(model) == mask.num_parameters(model)
        seen.append(rnd)
    assert seen[0] == mask.random_like(0, model) and len({str(r.to_dict()) for r in seen}) == 4


def test_random_like_neurons_is_unfair_under_gqa():
    model = tiny_model("llama")
    mask = KeystoneMask({("attn_k", 0, None): [0, 12]})  # heads 0 and 1 read kv head 0, channel 0: one row
    assert mask.num_parameters(model) == 48
    k_proj = "model.layers.0.self_attn.k_proj"
    rows = [len(mask.random_like(s, model, match="neurons").weight_indices(model)[k_proj].rows) for s in range(8)]
    assert max(rows) == 2  # neuron-count matching usually draws two rows, twice the weights
    assert all(mask.random_like(s, model).num_parameters(model) == 48 for s in range(8))
    with pytest.raises(ValueError, match="match='weights'\\) needs the model"):
        mask.random_like(0)
    with pytest.raises(ValueError, match="match must be one of"):
        mask.random_like(0, model, match="rows")

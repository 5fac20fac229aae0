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
    mask = KeystoneMask.from_dict({"attn_q": {"0": [1]}, "attn_k": {"0": [2]}, "attn_v": {"0": [3]}, "attn_o": {"1": [4]}})
    got = _as_lists(mask.weight_indices(model))
    assert got == {"transformer.h.0.attn.c_attn": ([1, 50, 99], []), "transformer.h.1.attn.c_proj": ([], [4])}
    w, bias = arch.weight_2d(model, "transformer.h.0.attn.c_attn")
    conv = model.transformer.h[0].attn.c_attn
    assert w.shape == (144, 48) and torch.equal(w, conv.weight.t()) and bias is conv.bias
    # biases of owned rows count as parameters
    assert mask.num_parameters(model) == 3 * 48 + 3 + 48 * 1


def test_json_round_trip_keeps_neurons_metadata_and_reference_layout(tmp_path, qwen3_moe):
    mask = KeystoneMask({("attn_q", 1, None): [9, 2], ("fwd_up", 0, 3): [7], ("res_attn", 0, None): torch.tensor([4, 0])},
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
    r0, r0b, r1 = mask.random_like(0, qwen3), mask.random_like(0, qwen3), mask.random_like(1, qwen3)
    assert r0.counts() == mask.counts() == r1.counts()
    assert r0 == r0b and r0 != r1
    sizes = mask.index_sizes(qwen3)
    assert all(int(v.max()) < sizes[k] for k, v in r1.neurons.items())
    r1.validate(qwen3)
    with pytest.raises(ValueError, match="needs the model"):
        mask.random_like(0)
    mask.metadata["sizes"] = {"attn_q/0": 64, "fwd_down/1": 72, "attn_k/1": 64}
    assert mask.random_like(3).counts() == mask.counts()


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

"""The benchmark's cost models against hand-computed values, and a smoke run of its parts on a tiny shape.

No timing is asserted anywhere: the speed numbers live in bench/README.md, measured by
``keystone-kernels bench``.
"""

import json

import pytest
import torch

from keystone_kernels import KeystoneLinear, bench
from keystone_kernels.bench import (
    SHAPES,
    OptimizerCase,
    Shape,
    dense_adamw_bytes,
    keystone_step_bytes,
    keystone_tensor_layout,
    train_step_bound,
    train_step_bytes,
    train_step_flops,
    wgrad_flops,
)

# hidden 8, intermediate 16, 2 layers, 2 heads of 4, 1 kv head, vocab 32, tied embeddings
TINY = Shape("tiny", "llama", 8, 16, 2, 2, 1, 32, True)


def test_shape_parameter_counts_match_the_published_models():
    smol = SHAPES["smollm2-135m"]
    # per layer: q, o 576x576; k, v 192x576; gate, up, down 1536x576 -> 3,538,944; 30 layers
    assert smol.projection_params_per_layer == 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576 == 3_538_944
    assert smol.projection_params == 106_168_320
    # + embeddings 49152 x 576 (tied) + 61 RMSNorms of 576
    assert smol.total_params == 134_515_008
    assert SHAPES["llama-3.2-1b"].total_params == 1_235_814_400
    assert SHAPES["llama-3.1-8b"].total_params == 8_030_261_248
    # Qwen3: head_dim 128 != hidden / heads = 64: q is 2048 x 1024, o is 1024 x 2048
    qwen = SHAPES["qwen3-0.6b"]
    assert dict((n, (o, i)) for n, o, i in qwen.projections())["q_proj"] == (2048, 1024)
    assert qwen.total_params == 596_049_920


def test_shape_builds_the_model_it_describes():
    model = bench.build_model(SHAPES["smollm2-135m"])  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == SHAPES["smollm2-135m"].total_params
    qwen = bench.build_model(SHAPES["qwen3-0.6b"], layers=1)
    assert qwen.model.layers[0].self_attn.q_proj.weight.shape == (2048, 1024)


def test_keystone_tensor_layout():
    # [10, 6] weight, rows {a, b}, 3 columns: a [2, 6] row tensor addressed by 2 row indices, and the
    # [8, 3] column tensor of the 8 other rows addressed by 8 row and 3 column indices
    assert keystone_tensor_layout(10, 6, 2, 3) == [(2, 6, 2, None), (8, 3, 8, 3)]
    assert keystone_tensor_layout(10, 6, 0, 3) == [(10, 3, None, 3)]  # columns only: all rows, no row index
    assert keystone_tensor_layout(10, 6, 2, 0) == [(2, 6, 2, None)]
    assert keystone_tensor_layout(10, 6, 0, 0) == []


def test_keystone_step_bytes_by_hand():
    layout = [(2, 6, 2, None), (8, 3, 8, 3)]  # 12 + 24 = 36 elements, 2 + 11 = 13 indices
    # per element: read g, m, v, p (16) + write m, v, p (12) + bf16 scatter (2) + norm pass (4) = 34
    assert keystone_step_bytes(layout) == 36 * 34 + 13 * 8 == 1328
    assert keystone_step_bytes(layout, grad_norm_pass=False) == 36 * 30 + 104 == 1184
    assert keystone_step_bytes(layout, frozen_bytes=4) == 36 * 36 + 104 == 1400
    assert keystone_step_bytes([]) == 0


def test_dense_adamw_bytes_by_hand():
    assert dense_adamw_bytes(1000) == 28_000  # read p, g, m, v; write p, m, v
    assert dense_adamw_bytes(1000, masked=True) == 37_000  # + read g and a bool mask, write g
    assert dense_adamw_bytes(1000, masked=True, mask_bytes=4) == 40_000
    # the ideal ratio at SmolLM2-135M, 0.1% of neurons in rows of q: 3.9 GB against a few MB
    assert dense_adamw_bytes(SHAPES["smollm2-135m"].projection_params, masked=True) == 3_928_227_840


def test_wgrad_flops_by_hand():
    assert wgrad_flops(5, 7, 3) == 2 * 5 * 7 * 3 == 210  # dense dY^T X
    # rows {r1, r2}: 2 x 3 entries; column c of the 5 other rows: 5 entries; 2 FLOPs per entry and token
    assert wgrad_flops(5, 7, 3, n_rows=2, n_cols=1) == 2 * 5 * (2 * 3 + 5 * 1) == 110
    assert wgrad_flops(5, 7, 3, n_rows=0, n_cols=0) == 0


def test_train_step_flops_by_hand():
    # TINY: per layer q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 = 576; P = 1152
    assert TINY.projection_params == 1152
    # T = 2 x 3 = 6 tokens, V = 32 x 8 = 256, attention 2 layers x 4 x 2 x 3^2 x (2 x 4) = 1152
    dense = train_step_flops(TINY, batch=2, seq=3)
    assert dense == {"forward": 2 * 6 * 1408 + 1152, "input_grad": 2 * 6 * 1408 + 2 * 1152,
                     "weight_grad": 2 * 6 * 1408, "total": 18048 + 19200 + 16896}
    assert dense["total"] == 54144
    keystone = train_step_flops(TINY, batch=2, seq=3, keystone_params=100)
    assert keystone["weight_grad"] == 2 * 6 * 100
    assert keystone["total"] == 18048 + 19200 + 1200 == 38448


def test_synthetic_masks_hold_the_fraction():
    model = bench.build_model(SHAPES["smollm2-135m"])
    mask = bench.synthetic_mask(model, 1e-3)
    assert mask.metadata["total_neurons"] == 30 * (3 * 576 + 576 + 1536 + 1536) == 161_280  # q, k, v, o query space
    assert mask.num_neurons == 161  # round(161.28)
    assert bench.synthetic_mask(model, 1e-4).num_neurons == 16
    assert bench.synthetic_mask(model, 1e-3, seed=1).neurons != mask.neurons
    # one layer: max(1, round(f x size)) per type; q, k, v, o spaces hold 576, up / down 1536
    assert bench.layer_mask(model, 1e-3).num_neurons == 4 * 1 + 2 * 2  # round(0.576) = 1, round(1.536) = 2
    assert bench.layer_mask(model, 1e-2).num_neurons == 4 * 6 + 2 * 15  # round(5.76) = 6, round(15.36) = 15
    assert bench.layer_mask(model, 1e-4).num_neurons == 6  # at least one of each type


def test_bytes_model_counts_the_optimizers_tensors():
    case = OptimizerCase.build(TINY, TINY.layers, "cpu")
    ks = case.keystone(0.2, "reference")
    assert sum(n * m for n, m, _, _ in ks.layout) == sum(p.numel() for p in ks.params) > 0
    assert sum(p.numel() for p in ks.params) == ks.mask.num_parameters(case.meta)


def test_parse_fractions_and_cli_registration():
    from keystone_kernels.cli import build_parser

    assert bench.parse_fractions("0.1%, 0.01") == [pytest.approx(1e-3), 0.01]
    with pytest.raises(ValueError, match="fraction"):
        bench.parse_fractions("0")
    args = build_parser().parse_args(["bench", "--quick", "--device", "cpu", "--out", "x"])
    assert args.func is bench.cmd_bench and args.quick and args.out == "x"


def test_smoke_run_on_a_tiny_shape(monkeypatch):
    """Every part end to end on a tiny shape: results, summary and report (no timing asserted)."""
    monkeypatch.setitem(SHAPES, "tiny", TINY)
    device = torch.device("cpu")
    results = {
        "machine": bench.machine_info(device),
        "config": {"device": "cpu", "loadavg_start": bench.loadavg()},
        "optimizer": [bench.bench_optimizer(TINY, [0.3], ["reference"], device, reps=1, budget=2**30,
                                            bandwidth=1e10, min_time_s=0, log=lambda s: None)],
        "wgrad": [bench.bench_wgrad(TINY, [0.1], ["reference"], device, tokens=16, reps=1, min_time_s=0,
                                     log=lambda s: None)],
        "train": [],
    }
    spec = bench.TrainSpec("tiny", "dense", batch=2, seq=8, warmup=0, reps=1)
    dense = bench.train_worker(spec)
    keystone = bench.train_worker(bench.TrainSpec("tiny", "keystone", batch=2, seq=8, warmup=0, reps=1,
                                                  fraction=0.1, backend="reference"))
    assert dense["trainable"] == TINY.total_params and 0 < keystone["trainable"] < TINY.projection_params
    for r in (dense, keystone):
        r["memory_bytes"], r["flops"] = 1, train_step_flops(TINY, 2, 8, r["trainable"] if r is keystone else None)
    keystone.update(fraction=0.1)
    results["train"].append({"shape": "tiny", "device": "cpu", "batch": 2, "seq": 8, "dense": dense,
                             "keystone": [keystone]})

    results["summary"] = bench.summarize(results)
    rows = results["summary"]["rows"]
    assert [r["fraction"] for r in rows["optimizer"]] == [0.3]
    assert set(results["optimizer"][0]["dense"]) == {"masked_foreach", "foreach", "masked_fused", "fused"}
    for r in rows["optimizer"]:  # allocation accounting, not timing: deterministic
        assert r["memory_ratio_vs_masked_foreach"] < 1
    assert rows["wgrad"][0]["flop_ratio"] > 1 and rows["train"][0]["flop_bound"] > 1
    text = bench.report(results)
    assert "optimizer step, tiny shapes" in text and "train step" in text
    # the plot is left to CI's `bench --quick` run (matplotlib takes seconds to import)
    json.dumps(results, default=str)


def test_lora_rows_beside_dense_and_keystone(monkeypatch):
    """PEFT LoRA train-step rows on a tiny shape: trainable count, optimizer state, the side-by-side summary."""
    pytest.importorskip("peft", reason="LoRA rows need the optional peft package")
    from keystone_kernels.bench.baselines import baseline_targets

    monkeypatch.setitem(SHAPES, "tiny", TINY)
    common = dict(batch=2, seq=8, warmup=1, reps=1)
    lora = bench.train_worker(bench.TrainSpec("tiny", "lora", lora_r=2, **common))
    # r (in + out) per projection: q, o 8x8 -> 32; k, v 4x8 -> 24; gate, up 16x8, down 8x16 -> 48; 2 layers
    assert lora["trainable"] == 2 * (2 * 32 + 2 * 24 + 3 * 48) == 512 and lora["lora_r"] == 2
    # exp_avg + exp_avg_sq in fp32, and torch AdamW's own 4-byte step per tensor (A and B of 14 projections)
    assert lora["optimizer_state_bytes"] == 2 * 4 * 512 + 4 * 28
    keystone = bench.train_worker(bench.TrainSpec("tiny", "keystone", fraction=0.1, backend="reference", **common))
    # KeystoneAdamW: moments are views of two flat arenas, one step tensor shared by the group
    assert keystone["optimizer_state_bytes"] == 2 * 4 * keystone["trainable"] + 4
    dense = bench.train_worker(bench.TrainSpec("tiny", "dense", **common))
    for r in (dense, keystone, lora):
        r["memory_bytes"], r["flops"] = 1000, train_step_flops(TINY, 2, 8, None if r is dense else r["trainable"])
    keystone["fraction"], lora["memory_bytes"] = 1e-3, 2000
    results = {"machine": bench.machine_info(torch.device("cpu")),
               "config": {"device": "cpu", "default_backend": "reference"},
               "train": [{"shape": "tiny", "device": "cpu", "batch": 2, "seq": 8, "dense": dense,
                          "keystone": [keystone], "lora": [lora], "liger": []}]}
    results["summary"] = bench.summarize(results)
    rows = results["summary"]["rows"]["baselines"]
    assert [r["kind"] for r in rows] == ["dense", "keystone", "lora"]
    assert rows[2]["keystone_speedup"] == pytest.approx(lora["time"]["median"] / keystone["time"]["median"])
    assert rows[2]["keystone_memory_ratio"] == 0.5 and rows[2]["memory_ratio_vs_dense"] == 2.0
    assert "train step beside PEFT LoRA" in bench.report(results) and "LoRA r=2 (PEFT)" in bench.report(results)
    # the issue-13 targets are read at SmolLM2-135M 4 x 128 (CPU): a row there is judged, a tiny one is not
    assert baseline_targets(results, rows) == []
    at_target = dict(rows[2], shape="smollm2-135m", batch=4, seq=128, rank=16, keystone_speedup=1.25,
                     keystone_memory_ratio=0.7)
    targets = baseline_targets(results, [at_target])
    assert [(t["goal"], t["holds"]) for t in targets] == [(">= 1.2", True), ("< 1", True)]


def test_bench_lora_and_liger_options():
    from keystone_kernels.bench.cli import parse_ranks
    from keystone_kernels.cli import build_parser, main

    assert parse_ranks("8, 16,64") == (8, 16, 64) and parse_ranks("none") == ()
    with pytest.raises(ValueError, match="positive integers"):
        parse_ranks("8,x")
    plan = bench.make_plan(torch.device("cpu"), quick=True)
    assert plan.lora_ranks == (16,) and plan.baseline_steps == (("smollm2-135m", 4, 128),)
    assert bench.make_plan(torch.device("cpu"), quick=False).lora_ranks == (8, 16, 64)
    args = build_parser().parse_args(["bench", "--lora-ranks", "8", "--name", "x"])
    assert args.lora_ranks == "8" and args.name == "x"
    assert main(["bench", "--liger", "--device", "cpu"]) == 2  # Liger-Kernel is GPU only: a clear error, exit 2


def test_a_failing_lora_row_keeps_the_dense_and_keystone_rows(monkeypatch):
    """peft missing (or a LoRA worker failing) costs the LoRA row only; the failure is recorded."""
    from keystone_kernels.bench import train as train_mod

    def fake(spec, timeout=1800):
        if spec.side == "lora":
            raise RuntimeError("train-step worker (lora, tiny) failed with exit code 1:\nImportError: no peft")
        return {"time": {"median": 2.0 if spec.side == "dense" else 1.0}, "trainable": 10, "peak_rss": 3,
                "rss_after_imports": 1, "backend": spec.backend}

    monkeypatch.setattr(train_mod, "run_train_subprocess", fake)
    out = train_mod.bench_train(TINY, torch.device("cpu"), 2, 8, [(0.1, "reference")], lora_ranks=(16,),
                                log=lambda s: None)
    assert [r["time"]["median"] for r in [out["dense"], *out["keystone"]]] == [2.0, 1.0] and out["lora"] == []
    assert out["failed"] == [{"row": "LoRA r=16, eager",
                              "error": "train-step worker (lora, tiny) failed with exit code 1:\nImportError: no peft"}]


def test_train_step_bytes_by_hand():
    """TINY: matrix-product weights W = 1152 projections + 256 lm_head (tied) = 1408, N = 1448 parameters."""
    weights, total = TINY.projection_params + TINY.vocab * TINY.hidden, TINY.total_params
    assert (weights, total) == (1408, 1448)
    # CUDA: weights read twice in bf16; AMP adds the cast (6), bf16 dW written and added into fp32 (8), AdamW 28 N
    assert train_step_bytes(TINY, "dense", 0, cuda=True) == 4 * 1408 + 14 * 1408 + 28 * 1448
    assert train_step_bytes(TINY, "dense", 0, cuda=False) == 8 * 1408 + 4 * 1408 + 28 * 1448
    assert train_step_bytes(TINY, "dense-bf16", 0, cuda=True) == 4 * 1408 + 2 * 1408 + 14 * 1448
    # keystone: an fp32 gradient (4) and the fused step (34) per keystone weight
    assert train_step_bytes(TINY, "keystone", 100, cuda=True) == 4 * 1408 + 38 * 100
    assert train_step_bytes(TINY, "lora", 100, cuda=True) == 4 * 1408 + 38 * 100
    assert train_step_bytes(TINY, "lora", 100, cuda=False) == 8 * 1408 + 32 * 100
    with pytest.raises(ValueError, match="side"):
        train_step_bytes(TINY, "full", 0, cuda=True)


def test_train_step_bound_adds_bytes_at_the_bandwidth_to_flops_at_the_gemm_rate():
    bound = train_step_bound(TINY, 2, 8, "keystone", 100, cuda=True, bandwidth=1e9, matmul_rate=1e6)
    flops = train_step_flops(TINY, 2, 8, 100)["total"]
    assert bound["flops"] == flops and bound["bytes"] == train_step_bytes(TINY, "keystone", 100, cuda=True)
    assert bound["seconds"] == pytest.approx(flops / 1e6 + bound["bytes"] / 1e9)
    lora = train_step_bound(TINY, 2, 8, "lora", 100, cuda=True, bandwidth=1e9, matmul_rate=1e6)
    part = train_step_flops(TINY, 2, 8, 0)
    assert lora["flops"] == part["forward"] + part["input_grad"] + 6 * 16 * 100
    dense = train_step_bound(TINY, 2, 8, "dense", 0, cuda=True, bandwidth=1e9, matmul_rate=1e6)
    assert dense["flops"] == train_step_flops(TINY, 2, 8)["total"] and dense["seconds"] > bound["seconds"]


def test_a_compiled_keystone_row_compiles_once_and_times_its_phases(monkeypatch):
    """The compiled side in-process (inductor on the CPU): its first step is timed apart, no step after it
    compiles again, and the phases are timed."""
    monkeypatch.setitem(SHAPES, "tiny", TINY)
    r = bench.train_worker(bench.TrainSpec("tiny", "keystone", batch=2, seq=8, warmup=1, reps=2, fraction=0.1,
                                           backend="reference", compile=True))
    assert r["label"] == "keystone 10%, compiled" and r["optimizer"] == "KeystoneAdamW(capturable, compile_step)"
    assert r["graphs_after_first_step"] >= 1 and r["graphs_after_timing"] == r["graphs_after_first_step"]
    assert r["first_step_s"] > r["time"]["median"] > 0
    assert set(r["phases"]) == {"forward", "backward", "optimizer"}
    assert all(p["host_s"] > 0 and p["device_s"] is None for p in r["phases"].values())


def _fake_rows(times: dict, calls: list):
    """A stand-in for run_train_subprocess: the time of each (side, compiled) from ``times``."""
    def fake(spec, timeout=1800):
        calls.append((spec.side, spec.compile, timeout))
        t = times[(spec.side, spec.compile)] * (0.9 if spec.bf16_compute else 1.0)
        return {"time": {"median": t}, "trainable": 10, "peak_rss": 3 + spec.compile, "rss_after_imports": 1,
                "backend": spec.backend, "label": bench.side_label(spec), "spec": vars(spec),
                "lora_r": spec.lora_r if spec.side == "lora" else None, "tokens_per_s": 16 / t, "first_step_s": 5.0}
    return fake


TIMES = {("dense", False): 4.0, ("dense", True): 2.0, ("dense-bf16", True): 1.6, ("keystone", False): 1.0,
         ("keystone", True): 0.5, ("lora", False): 1.5, ("lora", True): 0.8}


def test_compiled_rows_run_every_side_at_its_best_and_are_compared_to_the_best_dense(monkeypatch):
    from keystone_kernels.bench import train as train_mod
    from keystone_kernels.bench.baselines import best_rows, best_table, best_targets

    monkeypatch.setitem(SHAPES, "tiny", TINY)
    calls = []
    monkeypatch.setattr(train_mod, "run_train_subprocess", _fake_rows(TIMES, calls))
    tr = train_mod.bench_train(TINY, torch.device("cpu"), 2, 8, [(0.1, "reference")], lora_ranks=(16,),
                               compiled=True, log=lambda s: None)
    assert [(s, c) for s, c, _ in calls] == [("dense", False), ("keystone", False), ("lora", False), ("dense", True),
                                             ("dense-bf16", True), ("keystone", True), ("keystone", False),
                                             ("keystone", True), ("lora", True)]
    results = {"config": {"device": "cpu", "bandwidth": {"limit": 1e10}, "matmul_rate": 1e9}, "train": [tr]}
    rows = best_rows(results)
    assert [r["config"] for r in rows] == ["dense fp32, eager", "keystone 10%, eager", "LoRA r=16, eager",
                                           "dense fp32, compiled", "dense bf16, compiled", "keystone 10%, compiled",
                                           "keystone 10% bf16, eager", "keystone 10% bf16, compiled",
                                           "LoRA r=16, compiled"]
    best = {r["config"]: r for r in rows}
    assert all(r["dense_best"] == "dense bf16, compiled" for r in rows)  # the fastest dense row
    ks = best["keystone 10%, compiled"]
    assert ks["speedup_vs_dense_best"] == pytest.approx(1.6 / 0.5) and ks["speedup_vs_dense_eager"] == 8.0
    assert ks["memory_ratio_vs_dense_best"] == 1.0 and ks["bound_s"] > 0 and not ks["recompiled"]
    assert best_targets(results, rows) == []  # the GPU targets are judged on CUDA runs only
    gpu = {"config": dict(results["config"], device="cuda")}
    at_1b = [dict(r, shape="llama-3.2-1b", batch=1, seq=512) for r in rows]
    targets = {t["target"].split(":")[1].strip(): t for t in best_targets(gpu, at_1b)}
    best = "keystone 10% bf16, compiled"  # the fastest keystone row: 0.9 x 0.5 s
    assert targets[f"{best} vs dense at its best (dense bf16, compiled)"]["value"] == pytest.approx(1.6 / 0.45)
    assert targets[f"{best} vs dense at its best (dense bf16, compiled)"]["holds"]
    assert targets[f"{best} vs dense AMP eager"]["value"] == pytest.approx(4.0 / 0.45)
    assert targets["keystone vs LoRA r=16, compiled, both compiled"]["value"] == pytest.approx(0.8 / 0.5)
    results["summary"] = {"rows": {"best": rows}}
    assert "every side at its best" in best_table(results) and "dense bf16, compiled" in best_table(results)


def test_rows_past_the_deadline_are_noted_not_run(monkeypatch):
    import time

    from keystone_kernels.bench import train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "run_train_subprocess", _fake_rows(TIMES, calls))
    tr = train_mod.bench_train(TINY, torch.device("cpu"), 2, 8, [(0.1, "reference")], lora_ranks=(16,),
                               compiled=True, deadline=time.monotonic() + 5, log=lambda s: None)
    assert [(s, c) for s, c, _ in calls] == [("dense", False), ("keystone", False)]  # dense and keystone always run
    assert all(t <= 5 for *_, t in calls)  # and never past the deadline
    assert [f["row"] for f in tr["failed"]] == ["LoRA r=16, eager", "dense fp32, compiled", "dense bf16, compiled",
                                                "keystone 10%, compiled", "keystone 10% bf16, eager",
                                                "keystone 10% bf16, compiled", "LoRA r=16, compiled"]
    assert all("deadline" in f["error"] for f in tr["failed"])


def test_train_compiled_and_deadline_options():
    from keystone_kernels.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--train-compiled", "--train-deadline", "90"])
    assert args.train_compiled and args.train_deadline == 90
    assert main(["bench", "--train-deadline", "-1", "--device", "cpu"]) == 2
    assert bench.make_plan(torch.device("cpu"), quick=True).train_reps == 3


def test_scatter_written_bytes_counts_whole_cache_lines_by_hand():
    from keystone_kernels.bench import scatter_written_bytes

    # a [8, 64] bf16 row-major weight (128 B rows = 2 lines each)
    assert scatter_written_bytes(torch.tensor([1, 5]), None, (8, 64), (64, 1), 2) == 2 * 2 * 64  # two whole rows
    # one keystone column, row-major: each of the 8 values in its own line
    assert scatter_written_bytes(None, torch.tensor([3]), (8, 64), (64, 1), 2) == 8 * 64
    # the same column with the weight column-major (strides (1, 8)): 8 values, 16 contiguous bytes, one line
    assert scatter_written_bytes(None, torch.tensor([3]), (8, 64), (1, 8), 2) == 64
    assert scatter_written_bytes(torch.tensor([], dtype=torch.int64), None, (8, 64), (64, 1), 2) == 0


def test_a_column_major_layout_writes_each_line_once(monkeypatch):
    """KeystoneSetup.write_amplification on a tiny model: the layer's column-major storage keeps the column
    scatters within 2x of their bytes, where row-major storage would write a whole line per value."""
    from keystone_kernels.bench.optimizer import KeystoneSetup

    layers = [KeystoneLinear(torch.randn(64, 256), None, torch.empty(0, dtype=torch.int64), torch.tensor([3, 4, 90]),
                             torch.bfloat16, "reference")]
    setup = KeystoneSetup(None, layers, [p for m in layers for p in m.keystone_parameters()], [])
    assert setup.write_amplification() <= 2
    layers[0].frozen_weight = layers[0].frozen_weight.contiguous()  # row-major: two lines per row for 3 values
    assert setup.write_amplification() > 10

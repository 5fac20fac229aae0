"""The baselines users would pick instead of keystone training: PEFT LoRA (and Liger-Kernel on the GPU).

:func:`bench_train` times them beside dense and keystone (``results["train"][i]["lora"]`` and
``["liger"]``); here are their rows (:func:`baseline_rows`), the targets they are judged by
(:func:`baseline_targets`), their table (:func:`baseline_table`) and a bar plot (:func:`plot_baselines`).
"""

from __future__ import annotations

import os

import torch

from ..utils.tables import fmt, format_table
from .cost import train_step_bound
from .shapes import SHAPES, Shape
from .timing import GIB

_MIB = 1024**2
# issue 13: keystone (0.1%) against LoRA r=16 on the same seven projections, same tokens
TARGET_RANK = 16
TARGETS = {"cpu": ("smollm2-135m", 4, 128, 1.2), "cuda": ("llama-3.2-1b", 4, 2048, 1.0)}


def apply_liger(shape: Shape, device: torch.device) -> None:
    """``liger_kernel.transformers.apply_liger_kernel_to_llama()`` (RoPE, RMSNorm, SwiGLU, fused linear
    cross-entropy) for models built afterwards. CUDA and Llama shapes only; untested until a GPU run."""
    if device.type != "cuda":
        raise ValueError("Liger-Kernel runs Triton GPU kernels: liger=True needs a CUDA device")
    if shape.family != "llama":
        raise ValueError(f"Liger rows are built for Llama shapes; {shape.name} is a {shape.family} model")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as err:
        raise RuntimeError("liger=True needs the liger-kernel package: pip install liger-kernel") from err
    apply_liger_kernel_to_llama()


def step_bound(results: dict, tr: dict, side: str, trainable: int) -> float | None:
    """:func:`train_step_bound` seconds of one row of train step ``tr``, at the bandwidth and GEMM rate
    the run measured (None for a run that measured no GEMM rate, or an unknown shape)."""
    cfg = results["config"]
    rate = cfg.get("matmul_rate")
    if not rate or tr["shape"] not in SHAPES:
        return None
    return train_step_bound(SHAPES[tr["shape"]], tr["batch"], tr["seq"], side, trainable,
                            cuda=tr["device"] == "cuda", bandwidth=cfg["bandwidth"]["limit"],
                            matmul_rate=rate)["seconds"]


def by_train_step(rows: list[dict]) -> list[tuple[tuple[str, int, int], list[dict]]]:
    """``rows`` grouped by train step, ``((shape, batch, seq), rows of it)``, in the order steps first appear."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["seq"]), []).append(r)
    return list(groups.items())


def _row(tr: dict, r: dict, kind: str, config: str) -> dict:
    t = r["time"]["median"]
    d = tr["dense"]
    return {"shape": tr["shape"], "batch": tr["batch"], "seq": tr["seq"], "kind": kind, "config": config,
            "fraction": r.get("fraction"), "rank": r.get("lora_r") if "lora" in kind else None,
            "backend": r.get("backend"), "trainable": r["trainable"],
            "optimizer_state_bytes": r.get("optimizer_state_bytes"),
            "time_s": t, "tokens_per_s": r["tokens_per_s"], "memory_bytes": r["memory_bytes"],
            "speedup_vs_dense": d["time"]["median"] / t, "memory_ratio_vs_dense": r["memory_bytes"] / d["memory_bytes"]}


def baseline_rows(results: dict) -> list[dict]:
    """Per train step that has LoRA (or Liger) rows: dense, keystone, LoRA and Liger rows side by side.

    LoRA rows also carry ``keystone_speedup`` (LoRA time / keystone time) and ``keystone_memory_ratio``
    (keystone memory / LoRA memory) against the keystone row at 0.1% of the default backend (else the
    first keystone row); Liger LoRA rows against the Liger keystone row.
    """
    default_backend = results["config"].get("default_backend")
    rows: list[dict] = []
    for tr in results.get("train", []):
        if not tr.get("lora") and not tr.get("liger"):
            continue
        here = [_row(tr, tr["dense"], "dense", f"dense ({tr['dense'].get('optimizer', 'AdamW')})")]
        keystone = [_row(tr, k, "keystone", f"keystone {100 * k['fraction']:g}% [{k['backend']}]")
                    for k in tr["keystone"]]
        here += keystone
        ref = ([r for r in keystone if r["backend"] == default_backend and abs(r["fraction"] - 1e-3) < 1e-12]
               or keystone[:1])
        for r in tr.get("lora", []):
            here.append(_row(tr, r, "lora", f"LoRA r={r['lora_r']} (PEFT)"))
            if ref:
                here[-1].update(keystone_speedup=here[-1]["time_s"] / ref[0]["time_s"],
                                keystone_memory_ratio=ref[0]["memory_bytes"] / here[-1]["memory_bytes"],
                                keystone_reference=ref[0]["config"])
                lora_s, keystone_s = (step_bound(results, tr, "lora", r["trainable"]),
                                      step_bound(results, tr, "keystone", ref[0]["trainable"]))
                if lora_s and keystone_s:
                    here[-1]["keystone_bound"] = lora_s / keystone_s
        liger_ref = None
        for r in tr.get("liger", []):
            if r["spec"]["side"] == "keystone":
                liger_ref = _row(tr, r, "keystone+liger", f"keystone {100 * r['spec']['fraction']:g}% + Liger")
                here.append(liger_ref)
            else:
                here.append(_row(tr, r, "lora+liger", f"LoRA r={r['lora_r']} + Liger"))
                if liger_ref is not None:
                    here[-1].update(keystone_speedup=here[-1]["time_s"] / liger_ref["time_s"],
                                    keystone_memory_ratio=liger_ref["memory_bytes"] / here[-1]["memory_bytes"],
                                    keystone_reference=liger_ref["config"])
        rows += here
    return rows


def baseline_targets(results: dict, rows: list[dict]) -> list[dict]:
    """Issue 13's targets: keystone (0.1%) at least ``goal``x the speed of LoRA r=16 at the target shape
    and tokens (CPU: SmolLM2-135M 4 x 128, >= 1.2x; CUDA: Llama-3.2-1B 4 x 2048, >= 1x), with less memory."""
    device = results["config"]["device"]
    shape, batch, seq, goal = TARGETS.get(device, TARGETS["cpu"])
    lora = [r for r in rows
            if r["kind"] == "lora" and r["rank"] == TARGET_RANK and r.get("keystone_speedup") is not None
            and (r["shape"], r["batch"], r["seq"]) == (shape, batch, seq)]
    if not lora:
        return []
    r = lora[0]
    bound = r.get("keystone_bound")
    mem = "peak RSS above imports" if device == "cpu" else "peak allocated"
    where = f"{shape}, {batch} x {seq}"
    return [
        {"target": f"train step, {where}: {r['keystone_reference']} vs PEFT LoRA r={TARGET_RANK} (x faster)",
         "value": r["keystone_speedup"], "goal": f">= {goal:g}", "holds": r["keystone_speedup"] >= goal,
         "backend": r["keystone_reference"].split("[")[-1].rstrip("]"),
         "note": "issue 13" + (f"; bound (bytes + FLOPs) {bound:.3g}x" if bound else "")},
        {"target": f"{mem}, {where}: {r['keystone_reference']} / PEFT LoRA r={TARGET_RANK}",
         "value": r["keystone_memory_ratio"], "goal": "< 1", "holds": r["keystone_memory_ratio"] < 1,
         "backend": r["keystone_reference"].split("[")[-1].rstrip("]"), "note": "issue 13"},
    ]


def baseline_table(results: dict, markdown: bool = False) -> str:
    """One table per train step with LoRA rows: dense, keystone, LoRA (and Liger) side by side."""
    rows = results.get("summary", {}).get("rows", {}).get("baselines", [])
    cpu = results["config"]["device"] == "cpu"
    out = []
    for key, sel in by_train_step(rows):
        mem = "peak RSS above imports GiB" if cpu else "peak allocated GiB"
        title = (f"train step beside PEFT LoRA (q, k, v, o, gate, up, down; alpha 2 r; "
                 f"base {'fp32' if cpu else 'bf16'}), "
                 f"{key[0]} shapes, batch {key[1]} x seq {key[2]}")
        out.append(f"\n**{title}**\n" if markdown else f"\n{title}")
        out.append(format_table(
            ["config", "trainable", "optimizer state MiB", "s/step", "tokens/s", mem, "x dense speed", "mem / dense",
             "keystone x faster", "bound", "keystone mem / this"],
            [[r["config"], f"{r['trainable']:,}", fmt(None if r["optimizer_state_bytes"] is None
                                                       else r["optimizer_state_bytes"] / _MIB, ".4g"),
              fmt(r["time_s"]), fmt(r["tokens_per_s"], ".0f"), fmt(r["memory_bytes"] / GIB),
              fmt(r["speedup_vs_dense"]), fmt(r["memory_ratio_vs_dense"]), fmt(r.get("keystone_speedup")),
              fmt(r.get("keystone_bound")), fmt(r.get("keystone_memory_ratio"))] for r in sel], markdown))
    return "\n".join(out)


# issue 20's GPU targets (Llama-3.2-1B, 0.1%): keystone at its best against each side at its best
BEST_TARGETS = {(1, 512): {"dense_best": 3.0, "dense_eager": 8.0}, (4, 2048): {"dense_best": 1.4, "memory": 0.3}}
LORA_COMPILED_GOAL = 1.05


def _label(r: dict, fallback: str) -> str:
    return r.get("label") or fallback


def best_rows(results: dict) -> list[dict]:
    """Per train step timed with ``compiled`` rows: every side eager and compiled, side by side.

    Rows: dense eager, its compiled and pure-bf16 compiled forms, the first keystone case eager and
    compiled (on the CPU also computing in bf16, eager and compiled), the compiled LoRA rank eager
    and compiled. Each carries ``speedup_vs_dense_eager``,
    ``speedup_vs_dense_best`` and ``memory_ratio_vs_dense_best`` (dense at its best: the fastest dense
    row), ``bound_s`` (:func:`step_bound`), ``first_step_s`` (compile time included) and ``phases``.
    """
    rows: list[dict] = []
    for tr in results.get("train", []):
        compiled = tr.get("best") or tr.get("compiled") or []  # "compiled": runs before the bf16-compute rows
        if not compiled:
            continue
        side = lambda r: r.get("spec", {}).get("side")  # noqa: E731
        lora_ranks = {r["spec"]["lora_r"] for r in compiled if side(r) == "lora"}
        picked = [("dense", tr["dense"])] + [("keystone", r) for r in tr["keystone"][:1]]
        picked += [("lora", r) for r in tr.get("lora", []) if r.get("lora_r") in lora_ranks]
        picked += [(side(r), r) for r in compiled]
        here = []
        for kind, r in picked:
            row = _row(tr, r, kind, _label(r, f"{kind}, eager"))
            row.update(compiled=bool(r.get("spec", {}).get("compile")), first_step_s=r.get("first_step_s"),
                       phases=r.get("phases"), bound_s=step_bound(results, tr, kind, r["trainable"]),
                       recompiled=(r.get("graphs_after_timing") or 0) > (r.get("graphs_after_first_step") or 0))
            here.append(row)
        dense_best = min((x for x in here if x["kind"].startswith("dense")), key=lambda x: x["time_s"])
        for row in here:
            row.update(speedup_vs_dense_eager=row.pop("speedup_vs_dense"),
                       speedup_vs_dense_best=dense_best["time_s"] / row["time_s"],
                       memory_ratio_vs_dense_best=row["memory_bytes"] / dense_best["memory_bytes"],
                       dense_best=dense_best["config"])
            row.pop("memory_ratio_vs_dense")
        rows += here
    return rows


def best_targets(results: dict, rows: list[dict]) -> list[dict]:
    """Issue 20's targets of keystone at its best (the faster of eager and compiled) on the GPU."""
    if results["config"]["device"] != "cuda":
        return []
    targets = []

    def add(name, value, goal, higher=True):
        targets.append({"target": name, "value": value, "goal": f"{'>=' if higher else '<='} {goal:g}",
                        "holds": value >= goal if higher else value <= goal, "backend": None, "note": "issue 20"})

    for key, sel in by_train_step(rows):
        keystone = [r for r in sel if r["kind"] == "keystone"]
        if not keystone:
            continue
        best = min(keystone, key=lambda r: r["time_s"])
        where = f"{key[0]}, {key[1]} x {key[2]}: {best['config']}"
        goals = BEST_TARGETS.get((key[1], key[2]), {}) if key[0] == "llama-3.2-1b" else {}
        if "dense_best" in goals:
            add(f"train step, {where} vs dense at its best ({best['dense_best']})", best["speedup_vs_dense_best"],
                goals["dense_best"])
        if "dense_eager" in goals:
            add(f"train step, {where} vs dense AMP eager", best["speedup_vs_dense_eager"], goals["dense_eager"])
        if "memory" in goals:
            add(f"peak allocated, {where} / dense at its best", best["memory_ratio_vs_dense_best"], goals["memory"],
                higher=False)
        ours = [r for r in keystone if r["compiled"]]
        lora = [r for r in sel if r["kind"] == "lora" and r["compiled"]]
        if ours and lora:
            add(f"train step, {key[0]}, {key[1]} x {key[2]}: keystone vs {lora[0]['config']}, both compiled",
                lora[0]["time_s"] / ours[0]["time_s"], LORA_COMPILED_GOAL)
            add(f"peak allocated, {key[0]}, {key[1]} x {key[2]}: keystone / LoRA, both compiled",
                ours[0]["memory_bytes"] / lora[0]["memory_bytes"], 1.0, higher=False)
    return targets


def _phases(p: dict | None) -> str:
    """``forward / backward / optimizer`` host ms (and device ms on CUDA) of one row."""
    if not p:
        return "-"
    host = "/".join(f"{p[k]['host_s'] * 1e3:.1f}" for k in ("forward", "backward", "optimizer"))
    if p["forward"].get("device_s") is None:
        return host
    return host + " | " + "/".join(f"{p[k]['device_s'] * 1e3:.1f}" for k in ("forward", "backward", "optimizer"))


def best_table(results: dict, markdown: bool = False) -> str:
    """One table per train step with compiled rows: each side eager and compiled, against dense at its best."""
    rows = results.get("summary", {}).get("rows", {}).get("best", [])
    cpu = results["config"]["device"] == "cpu"
    out = []
    for key, sel in by_train_step(rows):
        title = (f"every side at its best (eager and torch.compile), {key[0]} shapes, batch {key[1]} x seq {key[2]}; "
                 f"phases: forward/backward/optimizer host ms{'' if cpu else ' | device ms'}")
        out.append(f"\n**{title}**\n" if markdown else f"\n{title}")
        out.append(format_table(
            ["config", "trainable", "s/step", "first step s", "tokens/s",
             "peak RSS above imports GiB" if cpu else "peak allocated GiB", "x dense eager", "x dense best",
             "mem / dense best", "bound ms", "phases", "recompiled"],
            [[r["config"], f"{r['trainable']:,}", fmt(r["time_s"]), fmt(r["first_step_s"]),
              fmt(r["tokens_per_s"], ".0f"),
              fmt(r["memory_bytes"] / GIB), fmt(r["speedup_vs_dense_eager"]), fmt(r["speedup_vs_dense_best"]),
              fmt(r["memory_ratio_vs_dense_best"]), fmt(None if r["bound_s"] is None else r["bound_s"] * 1e3),
              _phases(r["phases"]), ("YES" if r["recompiled"] else "no") if r["compiled"] else "-"]
             for r in sel], markdown))
    return "\n".join(out)


def plot_baselines(results: dict, path: str | os.PathLike) -> bool:
    """Bars per config (dense, keystone, LoRA ranks, Liger): s/step, peak memory, optimizer state."""
    rows = results.get("summary", {}).get("rows", {}).get("baselines", [])
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = by_train_step(rows)
    colors = {"dense": "tab:grey", "keystone": "tab:orange", "lora": "tab:blue", "keystone+liger": "tab:red",
              "lora+liger": "tab:purple"}
    cpu = results["config"]["device"] == "cpu"
    panels = (("time_s", "s / train step", 1), ("memory_bytes", "peak RSS above imports, GiB" if cpu else
                                                 "peak allocated, GiB", GIB),
              ("optimizer_state_bytes", "optimizer state, MiB (log)", _MIB))
    fig, axes = plt.subplots(len(steps), 3, figsize=(13, 3.8 * len(steps)), squeeze=False)
    for i, (key, sel) in enumerate(steps):
        labels = [r["config"].replace(" (PEFT)", "").replace(" (torch AdamW", "\n(AdamW") for r in sel]
        for ax, (field, ylabel, unit) in zip(axes[i], panels):
            values = [(r[field] or 0) / unit for r in sel]
            ax.bar(range(len(sel)), values, color=[colors.get(r["kind"], "tab:green") for r in sel])
            ax.set_xticks(range(len(sel)), labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{key[0]} ({results['config']['device']}), {key[1]} x {key[2]}: {ylabel.split(',')[0]}",
                         fontsize=9)
            if field == "optimizer_state_bytes":
                ax.set_yscale("log")
            ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

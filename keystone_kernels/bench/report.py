"""Ratios and targets of a results dict (:func:`summarize`), its tables (:func:`report`) and plot."""

from __future__ import annotations

import os

from ..utils.tables import fmt, format_table, percent
from .baselines import baseline_rows, baseline_table, baseline_targets, best_rows, best_table, best_targets, step_bound
from .shapes import SHAPES
from .timing import GIB


def _bound_ratio(results: dict, tr: dict, keystone: dict) -> float | None:
    """The most a keystone row can gain over dense AdamW on this machine: dense's bound over its own
    (bytes and FLOPs, :func:`~keystone_kernels.bench.cost.train_step_bound`); None without a GEMM rate."""
    dense, ours = step_bound(results, tr, "dense", 0), step_bound(results, tr, "keystone", keystone["trainable"])
    return dense / ours if dense and ours else None


def summarize(results: dict) -> dict:
    """Ratios per case, and the docs/design.md section 8 targets that this run measured."""
    device = results["config"]["device"]
    rows: dict[str, list[dict]] = {"optimizer": [], "wgrad": [], "train": []}
    for o in results.get("optimizer", []):
        if o.get("skipped"):
            continue
        for k in o["keystone"]:
            t = k["time"]["median"]
            r = {"shape": o["shape"], "fraction": k["fraction"], "backend": k["backend"], "time_s": t,
                 "params": k["params"], "bandwidth_fraction": k["bandwidth_fraction"], "launches": k["launches"],
                 "write_amplification": k.get("write_amplification")}
            for name, d in o["dense"].items():
                r[f"speedup_vs_{name}"] = d["time"]["median"] / t
                r[f"memory_ratio_vs_{name}"] = k["memory_bytes"] / d["memory_bytes"]
            rows["optimizer"].append(r)
    for w in results.get("wgrad", []):
        for k in w["keystone"]:
            rows["wgrad"].append({"shape": w["shape"], "fraction": k["fraction"], "backend": k["backend"],
                                  "time_s": k["time"]["median"],
                                  "speedup": w["dense"]["time"]["median"] / k["time"]["median"],
                                  "flop_ratio": w["dense"]["flops"] / max(k["flops"], 1),
                                  "memory_ratio": k["memory_bytes"] / max(w["dense"]["memory_bytes"], 1)})
    for tr in results.get("train", []):
        d = tr["dense"]
        for k in tr["keystone"]:
            r = {"shape": tr["shape"], "batch": tr["batch"], "seq": tr["seq"], "fraction": k["fraction"],
                 "backend": k["backend"], "time_s": k["time"]["median"], "tokens_per_s": k["tokens_per_s"],
                 "dense_tokens_per_s": d["tokens_per_s"], "speedup": d["time"]["median"] / k["time"]["median"],
                 "flop_bound": d["flops"]["total"] / k["flops"]["total"],
                 "bound": _bound_ratio(results, tr, k),
                 "memory_ratio": k["memory_bytes"] / d["memory_bytes"]}
            if device == "cpu":
                r["memory_ratio_absolute_rss"] = k["peak_rss"] / d["peak_rss"]
            rows["train"].append(r)

    def find(kind, **want):
        return [r for r in rows[kind]
                if all((abs(r[k] - v) < 1e-12 if isinstance(v, float) else r[k] == v) for k, v in want.items())]

    default_backend = results["config"].get("default_backend")

    def best(kind, key, **want):
        """The row a target quotes: the default backend's (what ``backend="auto"`` picks) when measured,
        else the best backend's."""
        found = [r for r in find(kind, **want) if r.get(key) is not None]
        preferred = [r for r in found if r["backend"] == default_backend]
        return max(preferred or found, key=lambda r: r[key]) if found else None

    targets = []

    def target(name, row, key, goal, higher=True, why=""):
        if row is None:
            return
        v = row[key]
        holds = v >= goal if higher else v <= goal
        targets.append({"target": name, "value": v, "goal": f"{'>=' if higher else '<='} {goal:g}", "holds": holds,
                        "backend": row.get("backend"), "note": why})

    for h in results.get("host", []):
        for r in h["rows"]:
            if r["backend"] == ("ext" if device == "cpu" else default_backend) and not r["capturable"]:
                target(f"host work per extra keystone tensor in one step ({h['counts'][0]} vs {h['counts'][-1]} tiny "
                       "tensors), us", dict(r, slope_us=r["slope_s"] * 1e6), "slope_us", 2.0, higher=False)
    wa = best("optimizer", "fraction", fraction=1e-2, shape="smollm2-135m" if device == "cpu" else "llama-3.1-8b")
    if wa is not None and wa.get("write_amplification") is not None:
        target(f"optimizer step's scatter, 1%, {wa['shape']}: cache-line bytes written / bytes stored", wa,
               "write_amplification", 2, higher=False, why="issue 21")
    if device == "cpu":
        target("optimizer step, 0.1%, SmolLM2-135M, vs torch AdamW (foreach), no masking",
               best("optimizer", "speedup_vs_foreach", shape="smollm2-135m", fraction=1e-3),
               "speedup_vs_foreach", 500)
        tr = (best("train", "speedup", shape="smollm2-135m", fraction=1e-3, batch=4, seq=128)
              or best("train", "speedup", shape="smollm2-135m", fraction=1e-3))
        where = f"{tr['batch']} x {tr['seq']}, " if tr else ""
        target(f"full train step, SmolLM2-135M, {where}0.1%, vs dense AdamW", tr, "speedup", 1.5)
        target(f"peak RSS above imports, SmolLM2-135M train step, {where}0.1%", tr, "memory_ratio", 0.5, higher=False)
    else:
        target("optimizer step, 0.1%, Llama-3.1-8B, vs torch AdamW(fused) with masked gradients",
               best("optimizer", "speedup_vs_masked_fused", shape="llama-3.1-8b", fraction=1e-3),
               "speedup_vs_masked_fused", 200)
        target("optimizer step, 1%, Llama-3.1-8B, achieved / measured bandwidth",
               best("optimizer", "bandwidth_fraction", shape="llama-3.1-8b", fraction=1e-2), "bandwidth_fraction", 0.6)
        target("weight grad, 1%, Llama-3.1-8B layer, vs dense dW GEMM",
               best("wgrad", "speedup", shape="llama-3.1-8b", fraction=1e-2), "speedup", 10)
        tr = best("train", "speedup", shape="llama-3.2-1b", seq=2048, batch=4, fraction=1e-3)
        target("full train step, Llama-3.2-1B, 4 x 2048, 0.1%, vs dense AdamW", tr, "speedup", 1.5)
        target("peak memory ratio, Llama-3.2-1B, 4 x 2048, 0.1%", tr, "memory_ratio", 0.3, higher=False)
        target("full train step, Llama-3.2-1B, 1 x 512, 0.1%, vs dense AdamW",
               best("train", "speedup", shape="llama-3.2-1b", seq=512, batch=1, fraction=1e-3), "speedup", 3)
    rows["baselines"] = baseline_rows(results)  # PEFT LoRA (and Liger) beside dense and keystone
    targets += baseline_targets(results, rows["baselines"])
    rows["best"] = best_rows(results)  # every side eager and compiled
    targets += best_targets(results, rows["best"])
    return {"rows": rows, "targets": targets}


def report(results: dict, markdown: bool = False) -> str:
    """The tables of ratios and the targets, as plain text (or markdown)."""
    s = results["summary"]
    lines = []
    m = results["machine"]
    cfg = results["config"]

    def title(text):
        lines.append(f"\n**{text}**\n" if markdown else f"\n{text}")

    lines.append(f"machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs) | torch {m['torch']} "
                 f"| triton {m.get('triton')} | cuda {m['cuda']} | commit {m['commit']} "
                 f"| load average {cfg.get('loadavg_start')} -> {cfg.get('loadavg_end')}")
    for h in results.get("host", []):
        title(f"host work of one KeystoneAdamW step over tiny tensors ({h['device']}): the time per extra tensor")
        lo, hi = h["counts"][0], h["counts"][-1]
        lines.append(format_table(["backend", "capturable", f"us at {lo}", f"us at {hi}", "us per extra tensor"],
                            [[r["backend"], "yes" if r["capturable"] else "no",
                              fmt(r["times"][str(lo)]["median"] * 1e6), fmt(r["times"][str(hi)]["median"] * 1e6),
                              fmt(r["slope_s"] * 1e6)]
                             for r in h["rows"]], markdown))
    for o in results.get("optimizer", []):
        if o.get("skipped"):
            title(f"optimizer step, {o['shape']}: skipped ({o['skipped']})")
            continue
        dense = ", ".join(f"{n} {d['time']['median'] * 1e3:.0f} ms" for n, d in o["dense"].items())
        title(f"optimizer step, {o['shape']} shapes, {o['layers']} of {o['of_layers']} layers, "
              f"{o['weights'] / 1e6:.1f}M projection weights; torch AdamW: {dense}")
        rows = [r for r in s["rows"]["optimizer"] if r["shape"] == o["shape"]]
        names = list(o["dense"])
        mem_key = "masked_foreach" if "masked_foreach" in names else names[0]
        lines.append(format_table(
            ["keystone", "params", "backend", "ms", *[f"x {n}" for n in names], f"mem / {mem_key}", "bytes/s / limit",
             "scatter lines / bytes", "launches"],
            [[percent(r["fraction"]), r["params"], r["backend"], fmt(r["time_s"] * 1e3),
              *[fmt(r[f"speedup_vs_{n}"], ".4g") for n in names], fmt(r[f"memory_ratio_vs_{mem_key}"]),
              fmt(r["bandwidth_fraction"], ".1%"), fmt(r.get("write_amplification")), fmt(r["launches"], "d")]
             for r in rows], markdown))
    for w in results.get("wgrad", []):
        d = w["dense"]
        title(f"weight gradient, {w['shape']} shapes, the 7 projections of one layer, "
              f"{w['tokens']} tokens {w['dtype']}: "
              f"dense dW {d['time']['median'] * 1e3:.1f} ms ({d['flops_per_s'] / 1e9:.0f} GFLOP/s)")
        rows = [r for r in s["rows"]["wgrad"] if r["shape"] == w["shape"]]
        ks = {(k["fraction"], k["backend"]): k for k in w["keystone"]}
        lines.append(format_table(
                            ["keystone", "params", "backend", "ms", "speedup", "FLOP ratio", "GFLOP/s", "mem ratio"],
                            [[percent(r["fraction"]), ks[(r["fraction"], r["backend"])]["params"], r["backend"],
                              fmt(r["time_s"] * 1e3), fmt(r["speedup"], ".4g"), fmt(r["flop_ratio"], ".4g"),
                              fmt(ks[(r["fraction"], r["backend"])]["flops_per_s"] / 1e9), fmt(r["memory_ratio"])]
                             for r in rows], markdown))
    for tr in results.get("train", []):
        d = tr["dense"]
        cpu = tr["device"] == "cpu"
        mem = "peak RSS above the RSS after imports" if cpu else "peak allocated"
        title(f"train step (forward + backward + optimizer), {tr['shape']} shapes, "
              f"batch {tr['batch']} x seq {tr['seq']}: "
              f"dense ({d['optimizer']}) {d['time']['median']:.3f} s/step, {d['tokens_per_s']:.0f} tokens/s, "
              f"{mem} {d['memory_bytes'] / GIB:.2f} GiB"
              + (f" (absolute peak RSS {d['peak_rss'] / GIB:.2f} GiB)" if cpu else ""))
        rows = [r for r in s["rows"]["train"]
                if r["shape"] == tr["shape"] and r["seq"] == tr["seq"] and r["batch"] == tr["batch"]]
        ks = {(k["fraction"], k["backend"]): k for k in tr["keystone"]}
        lines.append(format_table(
            ["keystone", "params", "backend", "s/step", "tokens/s", "speedup", "bound", "memory GiB", "mem ratio"]
            + (["abs RSS ratio"] if cpu else []),
            [[percent(r["fraction"]), ks[(r["fraction"], r["backend"])]["trainable"], r["backend"], fmt(r["time_s"]),
              fmt(r["tokens_per_s"], ".0f"), fmt(r["speedup"]), fmt(r.get("bound")),
              fmt(ks[(r["fraction"], r["backend"])]["memory_bytes"] / GIB), fmt(r["memory_ratio"])]
             + ([fmt(r["memory_ratio_absolute_rss"])] if cpu else []) for r in rows], markdown))
    if s["rows"].get("baselines"):
        lines.append(baseline_table(results, markdown))
    if s["rows"].get("best"):
        lines.append(best_table(results, markdown))
    if s["targets"]:
        title("targets (docs/design.md section 8)")
        lines.append(format_table(["target", "backend", "measured", "goal", "holds"],
                            [[t["target"], t["backend"], fmt(t["value"], ".3g"), t["goal"],
                              "yes" if t["holds"] else "NO"]
                             for t in s["targets"]], markdown))
    return "\n".join(lines)


def plot(results: dict, path: str | os.PathLike) -> bool:
    """Speedup and memory ratio vs keystone fraction, one line per (benchmark, backend), one row per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = {k: v for k, v in results["summary"]["rows"].items() if k in ("optimizer", "wgrad", "train")}
    shapes = sorted({r["shape"] for kind in rows.values() for r in kind}, key=list(SHAPES).index)
    if not shapes:
        return False
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.6 * len(shapes)), squeeze=False)
    styles = {"optimizer": ("o", "-"), "wgrad": ("s", "--"), "train": ("^", ":")}
    colors = {"ext": "tab:orange", "triton": "tab:green", "reference": "tab:blue"}
    for i, shape in enumerate(shapes):
        ax_s, ax_m = axes[i]
        for kind, (marker, ls) in styles.items():
            sel = [r for r in rows[kind] if r["shape"] == shape]
            groups: dict[tuple, list] = {}
            for r in sel:
                groups.setdefault((r["backend"], r.get("batch"), r.get("seq")), []).append(r)
            for (backend, batch, seq), rs in groups.items():
                rs.sort(key=lambda r: r["fraction"])
                xs = [r["fraction"] * 100 for r in rs]
                label = {"optimizer": "optimizer vs masked AdamW", "wgrad": "weight grad vs dense dW",
                         "train": f"train step {batch}x{seq}"}[kind] + f" [{backend}]"
                key = "speedup_vs_masked_foreach" if kind == "optimizer" else "speedup"
                mkey = "memory_ratio_vs_masked_foreach" if kind == "optimizer" else "memory_ratio"
                if kind == "optimizer" and key not in rs[0]:
                    key = next(k for k in rs[0] if k.startswith("speedup_vs_"))
                    mkey = "memory_ratio_vs_" + key[len("speedup_vs_"):]
                color = colors.get(backend)
                ax_s.plot(xs, [r[key] for r in rs], marker=marker, linestyle=ls, color=color, label=label)
                ax_m.plot(xs, [r[mkey] for r in rs], marker=marker, linestyle=ls, color=color, label=label)
        for ax, title, ylabel in ((ax_s, "speedup over dense (x)", "speedup"),
                                  (ax_m, "memory keystone / dense", "ratio")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("keystone neurons (%)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape} ({results['config']['device']}): {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_s.axhline(1.0, color="grey", lw=0.8)
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

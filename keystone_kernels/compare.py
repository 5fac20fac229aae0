"""Fair comparisons: keystone vs random vs PEFT LoRA vs full fine-tuning (and the paper's recipe with its
controls), and the end-to-end demo.

``sweep`` trains every (mode, learning rate, seed) from the same base with the same budget and
evaluates target accuracy and preservation (perplexity on held-out English, QA accuracy) after each
run. The paper's claim is about the trade-off, so the summary compares modes at matched target
accuracy rather than at one learning rate; with several seeds every figure is the mean over seeds,
with its standard deviation beside it.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from . import sft
from .utils.io import atomic_write_text
from .utils.tables import format_table


@dataclass
class RunRecord:
    mode: str
    lr: float
    seed: int
    accuracy: float
    perplexity: float
    qa_accuracy: float
    trainable_parameters: int
    optimizer_state_bytes: int
    median_step_seconds: float
    losses: list[float]


def run_one(base: nn.Module, tokenizer, mask, dataset, items, mode: str, lr: float | None, steps: int, batch_size: int,
            seed: int = 0, backend: str | None = "auto", progress: bool = True, lora_r: int = 16) -> RunRecord:
    """Train a fresh copy of ``base`` and evaluate it; ``base`` itself is left unchanged."""
    model = copy.deepcopy(base)
    config = sft.SFTConfig(mode=mode, steps=steps, lr=lr, batch_size=batch_size, seed=seed, backend=backend,
                           save_every=0, lora_r=lora_r)
    result = sft.train(model, tokenizer, mask, dataset, config, progress=progress)
    metrics = sft.evaluate(model, tokenizer, items)
    return RunRecord(mode, config.learning_rate, seed, metrics["accuracy"], metrics["perplexity"],
                     metrics["qa_accuracy"],
                     result.trainable_parameters, result.optimizer_state_bytes, result.median_step_seconds,
                     result.losses)


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(base_metrics: dict, runs: list[RunRecord]) -> list[dict]:
    """Per mode: the learning rate of best mean target accuracy, with mean and spread over seeds there, and
    preservation at the accuracy every mode reached (matched, on the means)."""
    cells: dict[tuple[str, float], list[RunRecord]] = {}
    for r in runs:
        cells.setdefault((r.mode, r.lr), []).append(r)
    means = {k: {"accuracy": _spread([r.accuracy for r in v]),
                 "ppl_ratio": _spread([r.perplexity / base_metrics["perplexity"] for r in v]),
                 "qa": _spread([r.qa_accuracy for r in v]), "seeds": len(v)} for k, v in cells.items()}
    modes = list(dict.fromkeys(r.mode for r in runs))
    matched = min(max(m["accuracy"][0] for (mode, _), m in means.items() if mode == md) for md in modes)
    rows = []
    for md in modes:
        mine = {lr: m for (mode, lr), m in means.items() if mode == md}
        best_lr = max(mine, key=lambda lr: (mine[lr]["accuracy"][0], -mine[lr]["ppl_ratio"][0]))
        lr_at = min((lr for lr in mine if mine[lr]["accuracy"][0] >= matched), key=lambda lr: mine[lr]["ppl_ratio"][0])
        best = mine[best_lr]
        rows.append({"mode": md, "best_accuracy": best["accuracy"][0], "best_accuracy_sd": best["accuracy"][1],
                     "best_lr": best_lr, "seeds": best["seeds"],
                     "ppl_ratio_at_best": best["ppl_ratio"][0], "ppl_ratio_at_best_sd": best["ppl_ratio"][1],
                     "qa_at_best": best["qa"][0], "qa_at_best_sd": best["qa"][1],
                     "matched_accuracy": matched, "ppl_ratio_at_matched": mine[lr_at]["ppl_ratio"][0],
                     "qa_at_matched": mine[lr_at]["qa"][0], "lr_at_matched": lr_at})
    return rows


def runs_table(base_metrics: dict, runs: list[RunRecord]) -> str:
    rows = [("base", "-", "-", base_metrics["accuracy"], base_metrics["perplexity"], 1.0, base_metrics["qa_accuracy"],
             0, "-", "-")]
    rows += [(r.mode, f"{r.lr:g}", r.seed, r.accuracy, r.perplexity, r.perplexity / base_metrics["perplexity"],
              r.qa_accuracy, r.trainable_parameters, f"{r.optimizer_state_bytes / 2**20:.2f}",
              f"{r.median_step_seconds:.2f}") for r in runs]
    return format_table(["mode", "lr", "seed", "target acc", "ppl", "ppl x base", "QA acc", "trainable",
                         "opt state MiB", "s/step"], rows)


def summary_table(rows: list[dict]) -> str:
    pm = lambda mean, sd: f"{mean:.3f} +- {sd:.3f}"  # noqa: E731
    return format_table(["mode", "best acc (mean +- sd)", "at lr", "seeds", "ppl x base there", "QA there",
                         "matched acc", "ppl x base at matched", "QA at matched"],
                        [(r["mode"], pm(r["best_accuracy"], r["best_accuracy_sd"]), f"{r['best_lr']:g}", r["seeds"],
                          pm(r["ppl_ratio_at_best"], r["ppl_ratio_at_best_sd"]),
                          pm(r["qa_at_best"], r["qa_at_best_sd"]),
                          r["matched_accuracy"], r["ppl_ratio_at_matched"], r["qa_at_matched"]) for r in rows])


def plot_tradeoff(base_metrics: dict, runs: list[RunRecord], path: str | Path) -> None:
    """Target accuracy against perplexity ratio, one point per run (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for mode, marker in (("keystone", "o"), ("random", "s"), ("lora", "D"), ("full", "^"), ("paper", "P"),
                         ("paper-without-keystone", "X"), ("paper-random", "v")):
        pts = [r for r in runs if r.mode == mode]
        if pts:
            ax.scatter([r.perplexity / base_metrics["perplexity"] for r in pts], [r.accuracy for r in pts],
                       marker=marker, label=mode, s=50)
            for r in pts:
                ax.annotate(f"{r.lr:g}", (r.perplexity / base_metrics["perplexity"], r.accuracy), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    ax.axhline(base_metrics["accuracy"], color="grey", lw=0.8, ls="--", label="base accuracy")
    ax.set_xlabel("perplexity on held-out English / base (lower keeps more)")
    ax.set_ylabel("target accuracy (exact match)")
    ax.set_title("fine-tuning trade-off, one point per (mode, lr)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(curves: dict[str, list[float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(base: nn.Module, tokenizer, mask, dataset, items, grid: dict[str, list[float]], steps: int, batch_size: int,
          output_dir: str | Path, seeds: Iterable[int] = (0,), progress: bool = True, lora_r: int = 16) -> dict:
    """Run every (mode, lr, seed) of ``grid`` x ``seeds``; write ``compare.json``, ``compare.md`` and ``tradeoff.png``.

    Modes: any of :data:`~keystone_kernels.sft.MODES` (``lora``: PEFT LoRA of rank ``lora_r`` on the
    decoder projections). ``compare.json`` is rewritten after every run, so partial results survive."""
    seeds = list(seeds)
    if not any(grid.values()):
        raise ValueError("the learning-rate grid is empty: give at least one learning rate for one mode")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base_metrics = sft.evaluate(base, tokenizer, items)
    runs = []
    for mode, lrs in grid.items():
        for lr in lrs:
            for seed in seeds:
                runs.append(run_one(base, tokenizer, mask, dataset, items, mode, lr, steps, batch_size, seed,
                                    progress=progress, lora_r=lora_r))
                report = {"base": base_metrics, "runs": [asdict(r) for r in runs], "steps": steps,
                          "batch_size": batch_size, "seeds": seeds, "lora_r": lora_r, "seconds": time.time() - t0}
                atomic_write_text(out / "compare.json", json.dumps(report, indent=1))
    report["summary"] = summary(base_metrics, runs)
    atomic_write_text(out / "compare.json", json.dumps(report, indent=1))
    text = runs_table(base_metrics, runs) + "\n\n" + summary_table(report["summary"])
    atomic_write_text(out / "compare.md", text + "\n")
    plot_tradeoff(base_metrics, runs, out / "tradeoff.png")
    report["text"] = text
    return report

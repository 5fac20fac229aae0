"""The whole story on one model, end to end: find the keystone neurons, prove they matter (collapse
against a fair random control), then fine-tune only them against full fine-tuning on the same budget.

``keystone-kernels demo`` runs :func:`run_demo` on the default model.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import compare
from .analysis.discovery import find_keystone
from .analysis.verify import collapse_table
from .reports import collapse_summary, discovery_summary
from .sft import evaluate, fit_to_context, write_metrics
from .sft_data import load_sft_dataset
from .tasks import eval_items, resolve_data
from .utils.tables import format_table

__all__ = ["run_demo"]


def run_demo(model, tokenizer, output: str | Path, *, data: str = "arith-train", eval_path: str | None = None,
             steps: int = 80, batch_size: int = 8, seed: int = 0, top_fraction: float = 0.01,
             max_length: int = 256, max_eval_items: int = 100) -> dict:
    """Find, prove, fine-tune, compare; print each stage and write its files into ``output``.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer (left unchanged: each fine-tune
            trains a copy).
        output: folder for ``keystone_mask.json``, ``loss_curves.png`` and ``demo.json``.
        data: training file or shipped set; ``eval_path`` the prompt/answer eval set (default: the
            shipped one paired with ``data``), at most ``max_eval_items`` rows of it.
        steps, batch_size, seed, max_length: the fine-tuning budget, the same for both runs.
        top_fraction: the fraction of neurons each prompt group selects.

    Returns:
        ``{"base": metrics, "runs": [run, ...], "collapse": [row, ...]}``, also written to ``demo.json``.
    """
    t0 = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    items = eval_items(data, eval_path)[:max_eval_items]
    if not items:
        raise ValueError(f"the demo needs an eval set with prompt/answer rows: --data {data} has no shipped one, "
                         "name one with --eval")
    dataset = load_sft_dataset(resolve_data(data), tokenizer, max_length=fit_to_context(max_length, model))

    print("== 1. find keystone neurons (shipped math / code / knowledge / multilingual prompts)")
    found = find_keystone(model, tokenizer, top_fraction=top_fraction, progress=False)
    found.mask.to_json(out / "keystone_mask.json")
    print(discovery_summary(found).split("\n\n")[-1])

    print("\n== 2. proof: zero them vs zero random masks with as many neurons and weights per projection")
    collapse = collapse_table(model, tokenizer, found.mask, seeds=range(3))
    print(collapse_summary(collapse))

    print(f"\n== 3. fine-tune on {data}: keystone-only vs full, same budget ({steps} steps x {batch_size})")
    base = evaluate(model, tokenizer, items)
    runs = [compare.run_one(model, tokenizer, found.mask, dataset, items, mode, None, steps, batch_size, seed)
            for mode in ("keystone", "full")]
    print()
    print(format_table(
        ["", "target acc", "ppl (English)", "QA acc", "trainable params", "optimizer state", "s/step"],
        [("base", base["accuracy"], base["perplexity"], base["qa_accuracy"], "-", "-", "-")]
        + [(f"{r.mode} (lr {r.lr:g})", r.accuracy, r.perplexity, r.qa_accuracy, f"{r.trainable_parameters:,}",
            f"{r.optimizer_state_bytes / 2**20:.2f} MiB", f"{r.median_step_seconds:.2f}") for r in runs]))
    compare.plot_losses({f"{r.mode} (lr {r.lr:g})": r.losses for r in runs}, out / "loss_curves.png")
    report = {"base": base, "runs": [r.__dict__ for r in runs], "collapse": [r.__dict__ for r in collapse]}
    write_metrics(out / "demo.json", report)
    minutes = (time.time() - t0) / 60
    print(f"\nloss curves: {out / 'loss_curves.png'}; all figures: {out / 'demo.json'}; {minutes:.1f} min")
    return report

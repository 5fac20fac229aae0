"""Where do the paper's fine-tuning gains come from? Its recipe against its parts, on the default model.

For each shipped task (``arith-train``, ``multistep-train``), every mode trains a fresh copy of
SmolLM2-135M-Instruct with the same data, batches and budget:

- ``keystone``: the keystone rows / columns alone (this library's default);
- ``paper``: the recipe the paper's code runs (keystone plus gate_proj, norms, embeddings, lm_head, biases);
- ``paper-without-keystone``: the same extra parameters, no keystone tensor;
- ``paper-random``: the extras plus a fair random mask (same rows / columns per projection);
- ``lora``: PEFT LoRA r=16 on the seven decoder projections;
- ``full``: every parameter.

Each mode's learning rate is the best of a small grid on seed 0 (by target accuracy, then
perplexity); that learning rate then runs the other seeds. Reported per (task, mode): target
accuracy (greedy exact match on held-out problems), perplexity on held-out English over the base's
and QA accuracy, as mean and standard deviation over seeds. Results are written after every run
(``--out``/ablation.json); a rerun with the same ``--out`` skips the runs already there.

    python bench/paper_ablation.py --steps 60 --batch-size 8 --seeds 3 --out bench/results/paper_ablation_cpu

On the 2-core CPU the whole grid on both tasks does not fit a working day; ``--grid-tasks
arith-train`` searches the grid there only and gives ``multistep-train`` each mode's best lr from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from keystone_kernels import find_keystone, load_default_model
from keystone_kernels.compare import RunRecord, run_one
from keystone_kernels.sft import evaluate, fit_to_context
from keystone_kernels.sft_data import load_sft_dataset
from keystone_kernels.tasks import eval_items, resolve_data
from keystone_kernels.utils.io import atomic_write_text
from keystone_kernels.utils.tables import format_table

GRID = {
    "keystone": [1e-3, 3e-3],
    "paper": [5e-5, 2e-4],
    "paper-without-keystone": [5e-5, 2e-4],
    "paper-random": [5e-5, 2e-4],
    "lora": [3e-4, 1e-3],
    "full": [2e-5, 5e-5],
}
TASKS = ("arith-train", "multistep-train")


def _key(task: str, mode: str, lr: float, seed: int) -> str:
    return f"{task}|{mode}|{lr:g}|{seed}"


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}"


def _best_lr(runs: list[dict], task: str, mode: str) -> float:
    first = [r for r in runs if r["task"] == task and r["mode"] == mode and r["seed"] == 0]
    return max(first, key=lambda r: (r["accuracy"], -r["perplexity"]))["lr"]


def _grid(report: dict, task: str, mode: str) -> list[float]:
    """The learning rates to try on seed 0: the whole grid on a grid task, else the first task's best."""
    if task in report["grid_tasks"]:
        return GRID[mode]
    return [_best_lr(report["runs"], report["grid_tasks"][0], mode)]


def summarize(report: dict) -> str:
    lines = []
    for task in report["tasks"]:
        if task not in report["base"]:  # not reached yet in a partial run
            continue
        base = report["base"][task]
        rows = []
        for mode in GRID:
            runs = [r for r in report["runs"] if r["task"] == task and r["mode"] == mode]
            if not runs or not any(r["seed"] == 0 for r in runs):
                continue
            lr = _best_lr(report["runs"], task, mode)
            at = [r for r in runs if r["lr"] == lr]
            rows.append((mode, f"{lr:g}", len(at), _spread([r["accuracy"] for r in at]),
                         _spread([r["perplexity"] / base["perplexity"] for r in at]),
                         _spread([r["qa_accuracy"] for r in at]), f"{at[0]['trainable_parameters']:,}"))
        lines.append(f"{task} (base: target acc {base['accuracy']:.3f}, perplexity {base['perplexity']:.2f}, "
                     f"QA {base['qa_accuracy']:.2f})")
        lines.append(format_table(["mode", "best lr (seed 0)", "seeds", "target acc", "ppl x base", "QA acc",
                                   "trainable"], rows, markdown=True))
        lines.append("")
    return "\n".join(lines)


def _run(report: dict, done: set, save, model, tokenizer, mask, task_setup: tuple, mode: str, lr: float, seed: int,
         args) -> None:
    """Train and evaluate one (task, mode, lr, seed) unless ``report`` has it; record it and save."""
    task, dataset, items = task_setup
    if _key(task, mode, lr, seed) in done:
        return
    record: RunRecord = run_one(model, tokenizer, mask, dataset, items, mode, lr, args.steps, args.batch_size, seed,
                                backend=args.backend, progress=False)
    report["runs"].append({"task": task, **asdict(record)})
    done.add(_key(task, mode, lr, seed))
    save()
    print(f"{task} {mode} lr {lr:g} seed {seed}: acc {record.accuracy:.3f}, ppl {record.perplexity:.2f}, "
          f"QA {record.qa_accuracy:.2f} ({report['seconds'] / 60:.0f} min so far)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-items", type=int, default=100)
    parser.add_argument("--top-fraction", type=float, default=0.01)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--grid-tasks", default=",".join(TASKS),
                        help="tasks that search the lr grid; the others reuse the first grid task's best lr "
                             "(to fit a CPU budget: the grid is cut, never the seeds)")
    parser.add_argument("--modes", default=",".join(GRID))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default="bench/results/paper_ablation_cpu")
    args = parser.parse_args()
    tasks, grid_tasks = args.tasks.split(","), args.grid_tasks.split(",")
    if not set(grid_tasks) <= set(tasks) or tasks[0] not in grid_tasks:
        parser.error(f"--grid-tasks {args.grid_tasks!r} must be among --tasks {args.tasks!r} and include the "
                     "first task (the others take their learning rates from it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ablation.json"
    report = json.loads(path.read_text()) if path.is_file() else {"runs": [], "base": {}, "seconds": 0.0}
    report.update({"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds, "grid": GRID,
                   "tasks": tasks,
                   "grid_tasks": grid_tasks, "top_fraction": args.top_fraction})
    done = {_key(r["task"], r["mode"], r["lr"], r["seed"]) for r in report["runs"]}
    t0 = time.time() - report.get("seconds", 0.0)

    def save() -> None:
        report["seconds"] = time.time() - t0
        atomic_write_text(path, json.dumps(report, indent=1))
        atomic_write_text(out / "ablation.md", summarize(report) + "\n")

    model, tokenizer = load_default_model()
    mask = find_keystone(model, tokenizer, top_fraction=args.top_fraction, progress=False).mask
    report["mask_neurons"] = mask.num_neurons
    modes = args.modes.split(",")
    for task in report["tasks"]:
        dataset = load_sft_dataset(resolve_data(task), tokenizer, max_length=fit_to_context(256, model))
        items = eval_items(task, None)[: args.eval_items]
        if task not in report["base"]:
            report["base"][task] = evaluate(model, tokenizer, items)
            save()

        task_setup = (task, dataset, items)
        for mode in modes:  # the grid, on seed 0
            for lr in _grid(report, task, mode):
                _run(report, done, save, model, tokenizer, mask, task_setup, mode, lr, 0, args)
        for mode in modes:  # the other seeds, at each mode's best learning rate
            lr = _best_lr(report["runs"], task, mode)
            for seed in range(1, args.seeds):
                _run(report, done, save, model, tokenizer, mask, task_setup, mode, lr, seed, args)
    save()
    print(summarize(report))
    print(f"{report['seconds'] / 60:.0f} min in all; written {path} and {out / 'ablation.md'}")


if __name__ == "__main__":
    main()

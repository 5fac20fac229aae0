"""compare.summary: the best learning rate per mode by mean accuracy over seeds, with the spread beside it."""

import statistics

import pytest
import torch

from keystone_kernels.compare import RunRecord, summary, summary_table


def _run(mode, lr, seed, acc, ppl, qa):
    return RunRecord(mode, lr, seed, acc, ppl, qa, 10, 100, 1.0, [1.0])


def test_summary_takes_means_over_seeds_and_reports_the_spread():
    base = {"accuracy": 0.0, "perplexity": 30.0, "qa_accuracy": 0.4}
    runs = [_run("paper", 1e-4, s, a, p, q) for s, (a, p, q) in enumerate([(0.5, 33, 0.4), (0.7, 36, 0.3),
                                                                           (0.6, 30, 0.5)])]
    runs += [_run("paper", 3e-4, s, a, 60, 0.1) for s, a in enumerate([0.8, 0.2, 0.5])]  # mean 0.5 < 0.6
    runs += [_run("keystone", 1e-3, s, a, 31, 0.4) for s, a in enumerate([0.4, 0.45, 0.5])]
    rows = {r["mode"]: r for r in summary(base, runs)}
    paper = rows["paper"]
    assert paper["best_lr"] == 1e-4 and paper["seeds"] == 3
    assert paper["best_accuracy"] == pytest.approx(0.6)
    assert paper["best_accuracy_sd"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert paper["ppl_ratio_at_best"] == pytest.approx(statistics.fmean([33, 36, 30]) / 30)
    assert paper["qa_at_best"] == pytest.approx(0.4)
    assert rows["keystone"]["matched_accuracy"] == pytest.approx(0.45)  # the lowest best mean accuracy
    text = summary_table(list(rows.values()))
    assert "0.600 +- 0.100" in text and "paper" in text and "keystone" in text


def test_paper_ablation_summary_reads_a_partial_report():
    """bench/paper_ablation.py writes its table after every run: tasks not reached yet are left out,
    the learning rate is the best of seed 0 and the spread is over the seeds run at it."""
    from conftest import load_bench_script

    ablation = load_bench_script("paper_ablation")
    gen = torch.Generator().manual_seed(7)
    acc = torch.rand(4, generator=gen).tolist()
    runs = [{"task": "arith-train", "mode": "paper", "lr": lr, "seed": 0, "accuracy": a, "perplexity": 30.0 + i,
             "qa_accuracy": 0.4, "trainable_parameters": 1234}
            for i, (lr, a) in enumerate([(5e-5, acc[0]), (2e-4, acc[1])])]
    best = runs[0]["lr"] if acc[0] >= acc[1] else runs[1]["lr"]
    runs += [{**runs[0], "lr": best, "seed": s, "accuracy": acc[1 + s]} for s in (1, 2)]
    report = {"tasks": ["arith-train", "multistep-train"], "runs": runs,
              "base": {"arith-train": {"accuracy": 0.0, "perplexity": 30.0, "qa_accuracy": 0.3}}}
    text = ablation.summarize(report)
    assert "multistep-train" not in text
    seeds = [r["accuracy"] for r in runs if r["lr"] == best]
    row = next(line for line in text.splitlines() if line.startswith("| paper |"))
    assert f"| {best:g} | 3 | {statistics.fmean(seeds):.3f} +- {statistics.stdev(seeds):.3f} |" in row
    assert "1,234" in row

"""compare.summary: the best learning rate per mode by mean accuracy over seeds, with the spread beside it."""

import statistics

import pytest

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

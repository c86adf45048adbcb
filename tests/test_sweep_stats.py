"""Seeds as the report: t intervals against scipy, paired differences by hand, arms and their words."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from pipelines.lib.sweep.summary import COLUMNS, plot_summary, summary_markdown, summary_table, summary_words
from uta_core.stats import paired_difference, t_interval


def test_t_interval_matches_scipy():
    xs = [0.61, 0.58, 0.66, 0.63, 0.57]
    got = t_interval(xs)
    low, high = scipy_stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=scipy_stats.sem(xs))
    assert got.n == 5 and got.mean == pytest.approx(np.mean(xs))
    assert got.std == pytest.approx(np.std(xs, ddof=1))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


def test_t_interval_by_hand_and_small_n():
    # n=2, values 1 and 3: mean 2, sd sqrt(2), half-width t(0.975, 1) * sqrt(2)/sqrt(2) = 12.7062
    got = t_interval([1.0, 3.0])
    assert (got.low, got.high) == (pytest.approx(2 - 12.7062, abs=1e-4), pytest.approx(2 + 12.7062, abs=1e-4))
    one = t_interval([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low) and not one.resolved
    assert t_interval([float("nan"), None, 2.0]).n == 1  # non-finite values are not counted


def test_paired_difference_uses_only_the_seeds_both_ran():
    arm = {0: 0.70, 1: 0.72, 2: 0.69, 3: 0.99}
    base = {0: 0.60, 1: 0.61, 2: 0.60}
    diff = paired_difference(arm, base)  # seed 3 has no partner
    d = [0.10, 0.11, 0.09]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(d), scale=scipy_stats.sem(d))
    assert diff.n == 3 and diff.mean == pytest.approx(0.10)
    assert (diff.low, diff.high) == (pytest.approx(low), pytest.approx(high))
    assert diff.resolved  # 0.10 +- 0.025: above zero
    # Paired vs unpaired: a large seed effect shared by both arms cancels in the difference.
    noisy_base = {0: 0.2, 1: 0.5, 2: 0.8}
    noisy_arm = {s: v + 0.01 for s, v in noisy_base.items()}
    paired = paired_difference(noisy_arm, noisy_base)
    assert paired.mean == pytest.approx(0.01) and paired.std == pytest.approx(0.0, abs=1e-12)
    unpaired_half = t_interval(list(noisy_arm.values())).high - t_interval(list(noisy_arm.values())).mean
    assert unpaired_half > 0.5  # unpaired, the arms' spread (+-0.75) would swamp the 0.01 difference


def table_of(values: dict[str, list[float]], status=None):
    rows = []
    for strategy, vs in values.items():
        for seed, v in enumerate(vs):
            rows.append({"status": "DONE", "mask.strategy": strategy, "run.seed": seed, "zeroshot_top1": v, "step": 60})
    frame = pd.DataFrame(rows)
    if status:
        for i, s in status.items():
            frame.loc[i, "status"] = s
    return frame


def test_summary_per_arm_with_the_baseline_first_and_words():
    table = table_of({"block": [0.50, 0.52, 0.51], "block_reversed": [0.60, 0.61, 0.62], "random": [0.55, 0.49, 0.60]})
    summary = summary_table(table, ["mask.strategy"], "zeroshot_top1", {"mask.strategy": "block_reversed"})
    assert list(summary.columns) == COLUMNS
    assert list(summary["arm"]) == ["block_reversed", "block", "random"]
    base = summary.iloc[0]
    assert base["n"] == 3 and base["mean"] == pytest.approx(0.61) and math.isnan(base["diff_vs_baseline"])
    block = summary.iloc[1]
    assert block["diff_vs_baseline"] == pytest.approx(-0.10) and block["diff_n"] == 3
    d = [0.50 - 0.60, 0.52 - 0.61, 0.51 - 0.62]
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(d), scale=scipy_stats.sem(d))
    assert (block["diff_ci95_low"], block["diff_ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert bool(block["resolved"]) and not bool(summary.iloc[2]["resolved"])  # random: -0.063 +- 0.14
    words = summary_words(summary, "zeroshot_top1")
    assert "resolved: lower than the baseline" in words[1] and "not resolved" in words[2]
    md = summary_markdown(summary, "zeroshot_top1", words)
    assert md.startswith("| arm | n |") and "(baseline)" in md and "Student's t" in md


def test_the_first_arm_is_the_baseline_when_the_space_names_none_and_stopped_trials_are_left_out(tmp_path):
    table = table_of({"random": [0.5, 0.6], "block": [0.4, 0.45]}, status={1: "STOPPED"})
    summary = summary_table(table, ["mask.strategy"], "zeroshot_top1")
    assert list(summary["arm"]) == ["random", "block"] and summary.iloc[0]["n"] == 1
    words = summary_words(summary, "zeroshot_top1", left_out=1)
    assert "at least 2 paired seeds" in words[1] and "1 trial(s)" in words[-1]
    assert plot_summary(summary, "zeroshot_top1", tmp_path / "s.png").exists()
    assert summary_table(table.iloc[0:0], ["mask.strategy"], "zeroshot_top1").empty

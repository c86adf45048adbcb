"""A sweep's report per arm: n, mean, sd and 95% t interval of each arm's metric over its seeds, and the
paired difference of each arm against the baseline arm over the seeds both ran (``uta_core.stats``).

Only trials that reached their last step (DONE) count, all at that step: a stopped trial's value is from
an earlier step and is never averaged with finished ones (the summary says how many were left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.lib.sweep.report import new_figure, save_figure
from pipelines.lib.sweep.search_space import SEED_KEY, trial_label
from uta_core.stats import Interval, paired_difference, t_interval

COLUMNS = ["arm", "n", "mean", "std", "ci95_low", "ci95_high", "diff_vs_baseline", "diff_ci95_low",
           "diff_ci95_high", "diff_n", "resolved", "step"]


def arm_of(row: pd.Series | dict, arm_keys: list[str]) -> str:
    return trial_label({k: row[k] for k in arm_keys})


def summary_table(table: pd.DataFrame, arm_keys: list[str], metric: str,
                  baseline: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per arm (in the order the trials came), the baseline's first; ``resolved``: the difference's
    interval excludes 0. An arm's step is the step its values were taken at (all its trials share it)."""
    done = table[(table["status"] == "DONE") & table[metric].notna()].copy()
    done["arm"] = [arm_of(r, arm_keys) for _, r in done.iterrows()]
    arms = list(dict.fromkeys(done["arm"]))
    if not arms:
        return pd.DataFrame(columns=COLUMNS)
    base = next((a for a in arms if _matches(done[done["arm"] == a].iloc[0], baseline)), arms[0])
    arms = [base] + [a for a in arms if a != base]
    by_seed = {a: _by_seed(done[done["arm"] == a], metric) for a in arms}
    rows = []
    for arm in arms:
        rows_of = done[done["arm"] == arm]
        mean = t_interval(rows_of[metric].tolist())
        diff = paired_difference(by_seed[arm], by_seed[base]) if arm != base else None
        steps = sorted(set(int(s) for s in rows_of["step"]))
        rows.append(_row(arm, mean, diff, steps))
    return pd.DataFrame(rows, columns=COLUMNS)


def _matches(row: pd.Series, baseline: dict[str, Any] | None) -> bool:
    return not baseline or all(row.get(k) == v for k, v in baseline.items())


def _by_seed(rows: pd.DataFrame, metric: str) -> dict[int, float]:
    if SEED_KEY not in rows:
        return {}
    return {int(s): float(v) for s, v in zip(rows[SEED_KEY], rows[metric])}


def _row(arm: str, mean: Interval, diff: Interval | None, steps: list[int]) -> dict[str, Any]:
    nan = float("nan")
    return {"arm": arm, "n": mean.n, "mean": mean.mean, "std": mean.std, "ci95_low": mean.low,
            "ci95_high": mean.high, "diff_vs_baseline": diff.mean if diff else nan,
            "diff_ci95_low": diff.low if diff else nan, "diff_ci95_high": diff.high if diff else nan,
            "diff_n": diff.n if diff else 0, "resolved": bool(diff and diff.resolved),
            "step": steps[0] if len(steps) == 1 else "/".join(map(str, steps))}


def summary_words(summary: pd.DataFrame, metric: str, left_out: int = 0) -> list[str]:
    """What the table says, in sentences: which differences from the baseline are resolved at this n."""
    if summary.empty:
        return [f"no trial reached its last step with a value of {metric}: nothing to compare"]
    base = summary.iloc[0]
    lines = [f"baseline {base['arm']}: {metric} {_num(base['mean'])} (n={base['n']}, 95% CI "
             f"{_num(base['ci95_low'])} to {_num(base['ci95_high'])}) at step {base['step']}"]
    for _, r in summary.iloc[1:].iterrows():
        if r["diff_n"] < 2:
            lines.append(f"{r['arm']} vs {base['arm']}: {_signed(r['diff_vs_baseline'])} over {r['diff_n']} paired "
                         "seed(s): not resolved (an interval needs at least 2 paired seeds)")
            continue
        verdict = ("resolved: " + ("higher" if r["diff_vs_baseline"] > 0 else "lower") + " than the baseline"
                   if r["resolved"] else "not resolved (its interval contains 0)")
        lines.append(f"{r['arm']} vs {base['arm']}: {_signed(r['diff_vs_baseline'])} (95% CI "
                     f"{_signed(r['diff_ci95_low'])} to {_signed(r['diff_ci95_high'])}, n={r['diff_n']} paired "
                     f"seeds): {verdict}")
    if left_out:
        lines.append(f"{left_out} trial(s) that did not reach their last step are left out of these figures")
    return lines


def summary_markdown(summary: pd.DataFrame, metric: str, words: list[str]) -> str:
    head = ["arm", "n", f"mean {metric}", "sd", "95% CI", "diff vs baseline", "95% CI of diff", "step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in summary.iterrows():
        diff = ("(baseline)", "") if i == 0 else (_signed(r["diff_vs_baseline"]),
                                                  f"{_signed(r['diff_ci95_low'])} to {_signed(r['diff_ci95_high'])}")
        lines.append(f"| {r['arm']} | {r['n']} | {_num(r['mean'])} | {_num(r['std'])} | "
                     f"{_num(r['ci95_low'])} to {_num(r['ci95_high'])} | {diff[0]} | {diff[1]} | {r['step']} |")
    intervals = "95% intervals: Student's t over seeds; differences paired by seed (same init, data order, masks)."
    return "\n".join(lines + ["", intervals, ""] + [f"- {w}" for w in words]) + "\n"


def plot_summary(summary: pd.DataFrame, metric: str, path: str | Path) -> Path | None:
    """Each arm's mean (a dot) with its 95% interval (a bar), the baseline's mean as a dashed line; None without
    arms. Dots, not bars: the axis starts where the values are, and a bar's length would suggest a ratio."""
    if summary.empty:
        return None
    fig, ax = new_figure()
    low = (summary["mean"] - summary["ci95_low"]).fillna(0).clip(lower=0)
    high = (summary["ci95_high"] - summary["mean"]).fillna(0).clip(lower=0)
    x = range(len(summary))
    ax.errorbar(x, summary["mean"], yerr=[low, high], fmt="o", capsize=5, color="tab:blue")
    ax.plot([0], [summary["mean"].iloc[0]], "o", color="grey")
    ax.axhline(summary["mean"].iloc[0], color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(x), summary["arm"], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(summary) - 0.5)
    finite = pd.concat([summary["ci95_low"], summary["mean"], summary["ci95_high"]]).dropna()
    if not finite.empty:
        pad = max(1e-6, 0.15 * float(finite.max() - finite.min()))
        ax.set_ylim(float(finite.min()) - pad, float(finite.max()) + pad)
    ax.set_ylabel(f"{metric} (mean, 95% CI over seeds)")
    ax.set_title(f"dashed: the baseline {summary['arm'].iloc[0]}; n per arm: "
                 f"{', '.join(str(n) for n in summary['n'])}", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _num(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{x:.4f}"


def _signed(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{x:+.4f}"

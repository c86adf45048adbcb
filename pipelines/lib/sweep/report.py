"""Sweep results as a table and a picture: one row per trial, each value with the step it was taken at.

A trial's history is ``[{"step": s, <metric>: v}, ...]`` from one source (its MLflow run when the sweep
tracks, else Tune's reports), so the CSV, the plot and MLflow hold the same numbers. A trial ASHA
stopped is STOPPED at its own step: it is drawn as a marker of its own, never joined in one line with
trials that reached their last step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

RATIO_KEY, STRATEGY_KEY = "mask.mask_ratio", "mask.strategy"


def trial_status(error: bool, step: int | None, total_steps: int | None) -> str:
    """ERROR (raised), STOPPED (ended by the scheduler before its last step) or DONE."""
    if error:
        return "ERROR"
    return "STOPPED" if step is not None and total_steps is not None and step < total_steps else "DONE"


def results_table(
    trials: list[dict[str, Any]], param_keys: list[str], metric: str, mode: str = "max"
) -> pd.DataFrame:
    """One row per trial: its id and run name, status, parameters, the last ``metric`` and its step, the best
    (``mode``: max or min) and its step, the trial's planned steps and how many values it logged.

    Each trial is ``{"trial_id", "run_name", "error": bool, "total_steps", "config": {...},
    "history": [{"step": s, metric: v}, ...]}``.
    """
    rows = []
    for t in trials:
        points = sorted((int(h["step"]), float(h[metric])) for h in t["history"]
                        if _finite(h.get(metric)) and h.get("step") is not None)
        last = points[-1] if points else (None, None)
        pick = max if mode == "max" else min
        best = pick(points, key=lambda p: p[1]) if points else (None, None)
        rows.append({
            "trial_id": t["trial_id"], "run_name": t.get("run_name"),
            "status": trial_status(t["error"], last[0], t.get("total_steps")),
            **{k: t["config"].get(k) for k in param_keys},
            metric: last[1], "step": last[0], f"best_{metric}": best[1], "best_step": best[0],
            "total_steps": t.get("total_steps"), "evaluations": len(points),
        })
    return pd.DataFrame(rows)


def metric_vs_ratio(table: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The plot's data. ``lines``: per (strategy, step), the mask ratios ascending and the mean ``metric`` of the
    DONE trials there (one line per step: trials with different budgets are never joined); ``stopped``: each
    STOPPED trial as (strategy, ratio, value, step)."""
    done = table[(table["status"] == "DONE") & table[metric].notna()]
    lines = {}
    by = [STRATEGY_KEY, "step"] if STRATEGY_KEY in table else ["step"]
    for key, rows in done.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        strategy, step = (str(key[0]), int(key[-1])) if len(key) == 2 else ("all", int(key[0]))
        mean = rows.groupby(RATIO_KEY)[metric].mean().sort_index()
        lines[f"{strategy} @ step {step}"] = ([float(r) for r in mean.index], [float(v) for v in mean.values])
    stopped = [(str(r.get(STRATEGY_KEY, "all")), float(r[RATIO_KEY]), float(r[metric]), int(r["step"]))
               for _, r in table[(table["status"] == "STOPPED") & table[metric].notna()].iterrows()]
    return {"lines": lines, "stopped": stopped}


def plot_metric_vs_ratio(table: pd.DataFrame, metric: str, path: str | Path) -> Path | None:
    """``metric`` against mask ratio: a line per strategy and step, stopped trials as crosses labelled with
    their step; None if the sweep does not vary the ratio or has no values."""
    if RATIO_KEY not in table or table[metric].isna().all():
        return None
    data = metric_vs_ratio(table, metric)
    fig, ax = new_figure()
    for label, (ratios, values) in data["lines"].items():
        ax.plot(ratios, values, marker="o", label=label)
    for i, (strategy, ratio, value, step) in enumerate(data["stopped"]):
        ax.plot([ratio], [value], marker="x", color="grey", linestyle="none",
                label="stopped early (its own step)" if i == 0 else None)
        ax.annotate(f"{strategy} @ {step}", (ratio, value), fontsize=7, color="grey",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(f"{metric} (last value)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

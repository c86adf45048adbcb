"""Sweep results as a table and a picture: metric against mask ratio, one line per strategy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

RATIO_KEY, STRATEGY_KEY = "mask.mask_ratio", "mask.strategy"


def trial_status(error: bool, last: dict[str, Any]) -> str:
    """ERROR (raised), STOPPED (ended by the scheduler before its last step) or DONE."""
    if error:
        return "ERROR"
    step, total = last.get("step"), last.get("total_steps")
    return "STOPPED" if step is not None and total is not None and step < total else "DONE"


def results_table(
    trials: list[dict[str, Any]], param_keys: list[str], metric: str, mode: str = "max"
) -> pd.DataFrame:
    """One row per trial: id, status, its parameters, the last and best metric (``mode``: max or min), steps done.

    Each trial is ``{"trial_id", "status", "config": {...}, "last": {...}, "history": [ {...}, ... ]}``.
    """
    rows = []
    for t in trials:
        values = [h[metric] for h in t["history"] if metric in h and _finite(h[metric])]
        rows.append({
            "trial_id": t["trial_id"],
            "status": t["status"],
            **{k: t["config"].get(k) for k in param_keys},
            metric: t["last"].get(metric),
            f"best_{metric}": (max if mode == "max" else min)(values) if values else None,
            "step": t["last"].get("step"),
            "evaluations": len(values),
        })
    return pd.DataFrame(rows)


def metric_vs_ratio(table: pd.DataFrame, metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per strategy: (mask ratios ascending, mean ``metric`` of the trials at each): the plot's lines."""
    groups = table.groupby(STRATEGY_KEY) if STRATEGY_KEY in table else [("all", table)]
    lines = {}
    for strategy, rows in groups:
        mean = rows.groupby(RATIO_KEY)[metric].mean().sort_index()
        lines[str(strategy)] = ([float(r) for r in mean.index], [float(v) for v in mean.values])
    return lines


def plot_metric_vs_ratio(table: pd.DataFrame, metric: str, path: str | Path) -> Path | None:
    """Line plot of ``metric`` against mask ratio per strategy; None if the sweep varies neither."""
    if RATIO_KEY not in table or table[metric].isna().all():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for strategy, (ratios, values) in metric_vs_ratio(table, metric).items():
        ax.plot(ratios, values, marker="o", label=strategy)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

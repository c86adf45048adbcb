"""A sweep's outputs, from one source: ``results.csv`` (a row per trial), ``summary.csv`` / ``summary.md`` (a row
per arm, with intervals and paired differences), the plots, and the same figures on the MLflow parent run.

A trial's history is read from its MLflow run when the sweep tracks (everything the trial logged, also the
steps it trained after ASHA's stop reached it, which Tune never saw), else from Tune's reports. Each child run
is then tagged with the status and step the table gives it, so MLflow and the CSV agree.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from pipelines.lib.sweep.report import plot_metric_vs_ratio, results_table
from pipelines.lib.sweep.search_space import SearchSpace, trial_run_name
from pipelines.lib.sweep.summary import plot_summary, summary_markdown, summary_table, summary_words
from uta_core import tracking

log = logging.getLogger("uta.sweep")


@dataclass(frozen=True, kw_only=True)
class SweepOutcome:
    csv: Path
    trials: int
    failed: int
    stopped: int

    @property
    def succeeded(self) -> int:
        return self.trials - self.failed

    def last_line(self, name: str) -> str:
        if not self.failed:
            return f"sweep {name}: {self.trials} trials, none failed ({self.stopped} stopped early by the scheduler)"
        return (f"sweep {name}: {self.failed} of {self.trials} trials FAILED (their errors: the status ERROR rows of "
                f"{self.csv} and the trials' logs); rerun the same --name to retry them")


def collect_trials(results: tune.ResultGrid, space: SearchSpace, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trial as ``report.results_table`` takes it, its history from its MLflow run where there is one."""
    uri, parent = sweep["tracking_uri"], sweep["parent_run_id"]
    runs = tracking.child_runs(uri, parent) if parent else {}
    trials = []
    for result in results:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or _trial_id_of(result.path)
        params = {k: result.config.get(k) for k in space.params}
        name = trial_run_name(params, trial_id, space.unique_labels)
        run_id = runs.get(name)
        if run_id:
            history = tracking.metric_history(uri, run_id, space.metric)
        else:
            frame = result.metrics_dataframe
            history = frame.to_dict("records") if frame is not None else []
        trials.append({"trial_id": trial_id, "run_name": name, "run_id": run_id, "error": bool(result.error),
                       "total_steps": last.get("total_steps"), "config": result.config, "history": history})
    return trials


def _trial_id_of(path: str) -> str:
    """A trial's id from its folder's name (``<trainable>_<id>_<n>_<params>_<date>``), for one that never reported."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", path.rsplit("/", 1)[-1])
    return found.group(1) if found else path.rsplit("/", 1)[-1]


def log_results(results: tune.ResultGrid, space: SearchSpace, out_dir: Path, sweep: dict[str, Any]) -> SweepOutcome:
    """Write and log the sweep's tables and plots; tag each child run with its row's status and step."""
    import mlflow

    trials = collect_trials(results, space, sweep)
    metric = space.metric
    table = results_table(trials, list(space.params), metric, space.mode)
    csv = out_dir / "results.csv"
    table.to_csv(csv, index=False)
    print(table.to_string(index=False))
    summary = summary_table(table, space.arm_keys, metric, space.baseline)
    left_out = int((table["status"] != "DONE").sum())
    words = summary_words(summary, metric, left_out)
    summary.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.md").write_text(summary_markdown(summary, metric, words))
    print("\n" + summary.to_string(index=False) + "\n" + "\n".join(words))
    plots = [plot_metric_vs_ratio(table, metric, out_dir / "metric_vs_mask_ratio.png"),
             plot_summary(summary, metric, out_dir / "summary.png")]
    for trial, (_, row) in zip(trials, table.iterrows()):
        if trial["run_id"]:
            tracking.set_tags(sweep["tracking_uri"], trial["run_id"],
                              {"uta.trial_status": row["status"], "uta.trial_step": row["step"]})
    if mlflow.active_run() is not None:
        for path in [csv, out_dir / "summary.csv", out_dir / "summary.md", *filter(None, plots)]:
            mlflow.log_artifact(str(path))
        _log_best(results, space)
    failed = int((table["status"] == "ERROR").sum())
    return SweepOutcome(csv=csv, trials=len(table), failed=failed, stopped=int((table["status"] == "STOPPED").sum()))


def _log_best(results: tune.ResultGrid, space: SearchSpace) -> None:
    import mlflow

    try:
        best = results.get_best_result(metric=space.metric, mode=space.mode, filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric: nothing to call best
        return
    mlflow.log_dict(best.config, "best_trial_config.yaml")
    value = best.metrics.get(space.metric)
    if value is not None:
        mlflow.log_metric(f"best_{space.metric}", float(value))
    if best.checkpoint is not None:
        mlflow.set_tag("best_checkpoint", best.checkpoint.path)

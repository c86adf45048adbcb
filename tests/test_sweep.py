"""A 2-trial masking sweep (two strategies) on a real local Ray from one teacher cache; then a rerun resumes."""

import csv

import pandas as pd
import pytest
import yaml

from pipelines import sweep
from pipelines.lib.smoke import sweep_overrides
from pipelines.lib.sweep.job import EXPERIMENT
from pipelines.lib.sweep.report import metric_vs_ratio

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ray_local):
    """Digits, a cache and a classifier from a tiny teacher; then the teacher's config is deleted,
    so a trial that tried to build a teacher would fail.

    The space is tune_spaces/smoke.yaml (ASHA on the loss) at one mask ratio (a trial costs
    ~40 s here, most of it starting its Ray Train worker), with ASHA's ``max_t`` at 2 reports:
    ASHA then stops every trial at its second report, the same way it stops a losing trial, but
    without depending on which trial happens to lose. One trial at a time on the 2-CPU test Ray,
    so each trial after the first starts right after ASHA stopped one."""
    workdir = tmp_path_factory.mktemp("sweep")
    overrides = sweep_overrides(workdir) + ["student.variant=tiny"]
    (workdir / "uta-smoke-tiny.json").unlink()
    space = yaml.safe_load((sweep.ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["scheduler"]["max_t"] = 2
    space["params"]["mask.mask_ratio"] = {"grid": [0.6]}
    (workdir / "space.yaml").write_text(yaml.safe_dump(space))
    args = sweep.parse_args(["--space", str(workdir / "space.yaml"), "--name", "smoke",
                             "--storage-path", str(workdir / "sweeps"), "--max-concurrent", "1"])
    return workdir, args, overrides


def mlflow_client(workdir):
    import mlflow

    return mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def mlflow_runs(workdir):
    client = mlflow_client(workdir)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id])


@pytest.mark.timeout(600)
def test_sweep_runs_every_trial_from_the_cache_and_tracks_them(smoke):
    workdir, args, overrides = smoke
    outcome = sweep.run(args, overrides)
    assert (outcome.trials, outcome.failed) == (2, 0)
    rows = list(csv.DictReader(outcome.csv.open()))
    assert len(rows) == 2  # 2 strategies x 1 ratio
    assert {(r["mask.strategy"], float(r["mask.mask_ratio"])) for r in rows} == {
        ("random", 0.6), ("block_reversed", 0.6)
    }
    # ASHA stopped every trial at its second report; the stop reaches a trial asynchronously, so one may
    # train on to its last step (4). Each row says which, at the step of its value; none failed; the trial
    # after a stopped one still got CPUs for its data (its placement group is released).
    assert all((r["status"] == "STOPPED") == (int(r["step"]) < 4) for r in rows), rows
    assert all(r["status"] in ("STOPPED", "DONE") for r in rows), rows
    assert all(float(r["loss"]) < 0 for r in rows)  # trained: cosine alignment above zero

    client = mlflow_client(workdir)
    runs = mlflow_runs(workdir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert len(parents) == 1 and sorted(children) == ["block_reversed-r0.6", "random-r0.6"]  # named by parameters
    for row in rows:  # one source: the CSV's value and step are the child run's last logged loss
        child = children[row["run_name"]]
        last = max(client.get_metric_history(child.info.run_id, "loss"), key=lambda m: m.step)
        assert (last.step, last.value) == (int(row["step"]), pytest.approx(float(row["loss"])))
        assert child.data.tags["uta.trial_status"] == row["status"] and child.data.tags["uta.trial_step"] == row["step"]
    # A stopped trial cannot end its own run: the sweep ends it KILLED, not RUNNING forever (FINISHED if
    # it reached its last step before its actor ended).
    assert all(c.info.status in ("KILLED", "FINISHED") for c in children.values())
    plot = metric_vs_ratio(pd.read_csv(outcome.csv), "loss")  # the plot's data: stopped trials at their own step
    assert sorted(s[3] for s in plot["stopped"]) == sorted(int(r["step"]) for r in rows if r["status"] == "STOPPED")
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "summary.csv", "summary.md", "metric_vs_mask_ratio.png", "best_trial_config.yaml"} \
        <= parent_artifacts


@pytest.mark.timeout(600)
def test_rerun_with_the_same_name_resumes_without_redoing_trials(smoke):
    workdir, args, overrides = smoke
    before = {r.info.run_id for r in mlflow_runs(workdir)}
    outcome = sweep.run(args, overrides)
    after = mlflow_runs(workdir)
    assert len(list(csv.DictReader(outcome.csv.open()))) == 2
    # No new run at all: no trial ran again, and the sweep continued its own parent run.
    assert {r.info.run_id for r in after} == before
    parent = next(r for r in after if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"


"""A 2-trial masking sweep (two strategies) on a real local Ray from one teacher cache; then a rerun resumes."""

import csv

import pytest
import yaml

from pipelines import sweep
from pipelines.lib.smoke import sweep_overrides
from pipelines.lib.sweep.job import EXPERIMENT

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
    results_csv = sweep.run(args, overrides)

    rows = list(csv.DictReader(results_csv.open()))
    assert len(rows) == 2  # 2 strategies x 1 ratio
    assert {(r["mask.strategy"], float(r["mask.mask_ratio"])) for r in rows} == {
        ("random", 0.6), ("block_reversed", 0.6)
    }
    # ASHA stopped every trial before its last step (4), none failed; the trial after a stopped
    # one still got CPUs for their data (its placement group is released: common.start_local_ray).
    assert all(r["status"] == "STOPPED" and int(r["step"]) < 4 for r in rows), rows
    assert all(float(r["loss"]) < 0 for r in rows)  # trained: cosine alignment above zero

    runs = mlflow_runs(workdir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert all("loss" in c.data.metrics for c in children)
    # A stopped trial cannot end its own run: the sweep tags it and ends it KILLED, not RUNNING
    # forever (FINISHED if it reached its last step before its actor ended: the stop is asynchronous).
    assert all(c.data.tags.get("uta.trial_status") == "STOPPED" for c in children)
    assert all(c.info.status in ("KILLED", "FINISHED") for c in children), [c.info.status for c in children]
    assert {c.data.params["mask.strategy"] for c in children} == {"random", "block_reversed"}
    parent_artifacts = {a.path for a in mlflow_client(workdir).list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "metric_vs_mask_ratio.png", "best_trial_config.yaml"} <= parent_artifacts


@pytest.mark.timeout(600)
def test_rerun_with_the_same_name_resumes_without_redoing_trials(smoke):
    workdir, args, overrides = smoke
    before = {r.info.run_id for r in mlflow_runs(workdir)}
    results_csv = sweep.run(args, overrides)
    after = {r.info.run_id for r in mlflow_runs(workdir)}
    assert len(list(csv.DictReader(results_csv.open()))) == 2
    # Only the sweep's own (parent) run is new: no trial ran again.
    assert len(after - before) == 1


"""The one launch path of every training job: hold the run folder, start the backend, plan, announce,
fit, report.

A job's ``run(cfg, backend)`` checks what it can before anything starts (paths, the teacher's fit)
and calls ``launch(cfg, plan_job, backend)``. Its ``plan_job(run, backend)`` builds the ``TrainJob``
and ``RunPlan`` from metadata once the folder is held, since a plan may write into the folder (the
streamed teacher's setup). Rerunning the same ``run.name`` in the same ``run.storage_path`` resumes
from the folder's newest complete checkpoint, exactly where each rank was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml

from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.train.backends import Backend
from pipelines.lib.train.config import PoolConfig
from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.spec import TrainJob
from uta_core import tracking
from uta_core.config import to_dict
from uta_core.data.storage import is_s3, join
from uta_core.errors import NonFiniteLoss
from uta_core.lease import LeaseLost
from uta_core.run.folder import MLFLOW_RUN_FILE, RunFolder

log = logging.getLogger("uta.train")
PlanJob = Callable[[RunFolder, Backend], tuple[TrainJob, RunPlan]]


def resolve_paths(cfg: Any) -> Any:
    """Make what workers must agree on absolute (the local storage path, the MLflow URI), after
    refusing outputs the job would lose (``destinations``). Idempotent; call it before Ray starts."""
    check_output("run.storage_path", cfg.run.storage_path)
    check_tracking(cfg.tracking)
    run = cfg.run
    if not is_s3(run.storage_path):
        run = dataclasses.replace(run, storage_path=str(Path(run.storage_path).expanduser().resolve()))
    trk = dataclasses.replace(cfg.tracking, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    return dataclasses.replace(cfg, run=run, tracking=trk)


def run_folder(cfg: Any) -> RunFolder:
    return RunFolder(join(cfg.run.storage_path, cfg.run.name), cfg.s3)


def launch(cfg: Any, plan_job: PlanJob, backend: Backend, pool: PoolConfig | None = None) -> dict:
    """Hold ``cfg``'s run folder, start ``backend`` (sized for ``pool``, the job's stage pool, if any), plan,
    save the resolved config, train, and return the run's report."""
    with run_folder(cfg).owned(cfg.run.lease) as run, backend.session(cfg.cluster, pool):
        job, plan = plan_job(run, backend)
        with mlflow_run_ends(run, cfg.tracking.tracking_uri):
            announce(job, plan, run, backend)
            rank0 = stopped_or(backend.fit(job, plan, run))
    return run_report(job, plan, run, rank0)


def announce(job: TrainJob, plan: RunPlan, run: RunFolder, backend: Backend) -> None:
    run.save_config(yaml.safe_dump({**to_dict(job.cfg), "plan": plan.summary()}, sort_keys=False))
    log.info("%s: %d rows (%s), %d steps/epoch, %d steps (warm-up %d), accumulation %d, %d workers (%s)", run.uri,
             plan.sources.total_rows, plan.sources.counted_from, plan.steps_per_epoch, plan.total_steps,
             plan.warmup_steps, plan.accumulation, job.cfg.cluster.num_workers, backend.name)


@contextlib.contextmanager
def mlflow_run_ends(run: RunFolder, tracking_uri: str | None) -> Iterator[None]:
    """Every MLflow run of the run folder ends FINISHED, FAILED or KILLED: one a previous attempt left
    RUNNING (its process killed) ends KILLED now (a resume reopens it), and this attempt's ends FAILED
    if training fails on a worker that could not end it (KILLED on Ctrl-C). A job that lost the folder
    to another job leaves the run to it."""
    _end_if_running(run, tracking_uri, "KILLED")
    try:
        yield
    except LeaseLost:
        raise
    except KeyboardInterrupt:
        _end_if_running(run, tracking_uri, "KILLED")
        raise
    except BaseException:
        _end_if_running(run, tracking_uri, "FAILED")
        raise


def _end_if_running(run: RunFolder, tracking_uri: str | None, status: str) -> None:
    record = run.mlflow_record()
    if record is None:
        return
    ours = tracking.resolve_tracking_uri(tracking_uri)
    if record["tracking_uri"] != ours:  # an edited record must not send this job's credentials elsewhere
        log.warning("%s names the MLflow store %s, this job's is %s: that run is left as it is (not contacted)",
                    run.uri_of(MLFLOW_RUN_FILE), record["tracking_uri"], ours)
        return
    try:
        run.guard(f"the end ({status}) of its MLflow run")
        client = mlflow.MlflowClient(ours)
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], status)
            log.info("%s: MLflow run %s ended %s", run.uri, record["run_id"], status)
    except LeaseLost:
        raise
    except Exception as err:  # the tracking server is away: the run stays as it is
        log.warning("%s: could not end its MLflow run (%s)", run.uri, str(err).splitlines()[0] if str(err) else err)


def stopped_or(rank0: dict) -> dict:
    """Rank 0's result, or the error it stopped with (every rank stopped at the same step, e.g. a NaN loss)."""
    if "stopped" in rank0:
        raise NonFiniteLoss(rank0["stopped"])
    return rank0


def run_report(job: TrainJob, plan: RunPlan, run: RunFolder, rank0: dict) -> dict:
    cfg, step = job.cfg, rank0.get("checkpoint_step")
    return {
        "run": cfg.run.name, "job": job.name, "steps": plan.total_steps,
        "checkpoint": run.checkpoint_uri(step) if step is not None else None,
        "export": run.export_uri if cfg.run.export else None,
        "history": rank0.get("history", []), "metrics": rank0.get("final", {}),
        "mlflow_run_id": rank0.get("mlflow_run_id"), "tracking_uri": cfg.tracking.tracking_uri,
    }


def print_report(report: dict, keys: tuple[str, ...]) -> None:
    """The run's final metrics and where its outputs are, as an aligned two-column table."""
    metrics = report["metrics"]
    rows = [("run", report["run"]), ("steps", report["steps"])]
    rows += [(k, f"{metrics[k]:.4g}" if isinstance(metrics[k], float) else str(metrics[k]))
             for k in keys if k in metrics]
    rows += [("checkpoint", report["checkpoint"] or "-"), ("export", report["export"] or "-")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["mlflow_run_id"]:
        print(tracking.where_runs_are(report["tracking_uri"], report["mlflow_run_id"]))

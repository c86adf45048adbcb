"""The driver side of every training job: paths, the resolved config, the TorchTrainer, the report.

A job's driver builds its ``TrainJob`` and ``RunPlan`` from metadata and calls ``fit`` (on a
connected Ray: a ``TorchTrainer`` whose workers run ``ray_runtime.train_loop_per_worker``) or
``fit_in_process`` (the same loop here, without Ray). Rerunning the same ``run.name`` in the
same ``run.storage_path`` resumes from the newest checkpoint, exactly where each rank was.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.progress import DriverProgress
from pipelines.lib.ray_setup import cluster_resources
from pipelines.lib.train.config import ClusterConfig, PoolConfig
from pipelines.lib.train.faults import Fault
from pipelines.lib.train.loop import train_worker
from pipelines.lib.train.outputs import EXPORT_DIR, MLFLOW_RUN_FILE
from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.ray_runtime import loop_config, train_loop_per_worker
from pipelines.lib.train.runtime import LocalRuntime
from pipelines.lib.train.spec import Stage, TrainJob
from pipelines.lib.train.stage_pool import StagePool, start_pool, stop_pool
from uta_core import tracking
from uta_core.checkpoint import checkpoint_dir_name, stored_checkpoint_steps
from uta_core.config import to_dict
from uta_core.data.storage import S3_SCHEME, filesystem_for, is_s3, join, read_bytes, s3_filesystem, write_bytes_atomic
from uta_core.errors import NonFiniteLoss
from uta_core.lease import Lease

log = logging.getLogger("uta.train")


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


def run_uri(cfg: Any) -> str:
    return join(cfg.run.storage_path, cfg.run.name)


def local_num_cpus(cluster: ClusterConfig, pool: PoolConfig | None = None) -> int:
    """Logical CPUs for a new local Ray: the workers' plus ``cluster.data_cpus`` for the read tasks,
    plus a stage pool's actors'."""
    stage = pool.actors * pool.cpus_per_actor if pool is not None else 0.0
    return math.ceil(cluster.num_workers * cluster.cpus_per_worker + cluster.data_cpus + stage)


def local_resources(cluster: ClusterConfig, pool: PoolConfig | None) -> dict[str, float] | None:
    """The custom resources a new local Ray offers so that the workers and a stage pool that name some can
    start (the pool's first ``actors``)."""
    wanted = collections.Counter({k: v * cluster.num_workers for k, v in cluster.worker_resources.items()})
    wanted.update({k: v * pool.actors for k, v in pool.resources.items()} if pool is not None else {})
    return dict(wanted) or None


def save_resolved_config(job: TrainJob, plan: RunPlan) -> None:
    fs, root = filesystem_for(plan.run_uri, job.cfg.s3)
    text = yaml.safe_dump({**to_dict(job.cfg), "plan": plan.summary()}, sort_keys=False)
    write_bytes_atomic(fs, join(root, "config.yaml"), text.encode())


def _announce(job: TrainJob, plan: RunPlan) -> None:
    save_resolved_config(job, plan)
    log.info("%s: %d rows (%s), %d steps/epoch, %d steps (warm-up %d), accumulation %d, %d workers", plan.run_uri,
             plan.sources.total_rows, plan.sources.counted_from, plan.steps_per_epoch, plan.total_steps,
             plan.warmup_steps, plan.accumulation, job.cfg.cluster.num_workers)


def build_trainer(job: TrainJob, plan: RunPlan, callbacks: list | None = None,
                  progress: str | None = None, pool: StagePool | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; ``callbacks`` (Ray Train ``UserCallback``s) let a sweep listen in;
    ``progress`` names the driver's progress board (``pipelines/lib/progress.py``); ``pool``: the
    actors of the job's stage, which every worker sends its blocks through."""
    cfg, cl = job.cfg, job.cfg.cluster
    resources = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {}), **cl.worker_resources}
    storage_path, storage_fs = cfg.run.storage_path, None
    if is_s3(storage_path):
        storage_path, storage_fs = storage_path[len(S3_SCHEME):], s3_filesystem(cfg.s3)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(job, plan, Fault.from_env(), progress, pool),
        scaling_config=ray.train.ScalingConfig(num_workers=cl.num_workers, use_gpu=cl.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's INFO: its log files
        ),
    )


def fit(job: TrainJob, plan: RunPlan, callbacks: list | None = None) -> dict:
    """On a connected Ray: save the resolved config, train, return the run's report (rank 0's history).
    A run of its own draws a progress bar; a sweep's trial (``callbacks``) reports to Tune instead."""
    with Lease(plan.run_uri, job.cfg.s3, "run").held(), mlflow_run_ends(plan.run_uri, job.cfg.s3):
        return _fit(job, plan, callbacks)  # one job at a time writes a run folder


@contextlib.contextmanager
def mlflow_run_ends(run_uri: str, s3):
    """Every MLflow run of the run folder ends FINISHED, FAILED or KILLED: one a previous attempt left
    RUNNING (its process killed) ends KILLED now (a resume reopens it), and this attempt's ends FAILED
    if training fails on a worker that could not end it (KILLED on Ctrl-C)."""
    _end_if_running(run_uri, s3, "KILLED")
    try:
        yield
    except KeyboardInterrupt:
        _end_if_running(run_uri, s3, "KILLED")
        raise
    except BaseException:
        _end_if_running(run_uri, s3, "FAILED")
        raise


def _end_if_running(run_uri: str, s3, status: str) -> None:
    fs, root = filesystem_for(run_uri, s3)
    data = read_bytes(fs, join(root, MLFLOW_RUN_FILE))
    if not data:
        return
    try:
        record = json.loads(data)
        client = mlflow.MlflowClient(record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], status)
            log.info("%s: MLflow run %s ended %s", run_uri, record["run_id"], status)
    except Exception as err:  # the tracking server is away: the run stays as it is
        log.warning("%s: could not end its MLflow run (%s)", run_uri, err)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def set_aside_damaged_snapshot(run_uri: str, s3) -> None:
    """Ray Train cannot start a run whose checkpoint snapshot is empty or torn (a full disk while it
    wrote it): move it aside, so Ray Train starts afresh and the loop resumes from the newest complete
    checkpoint on storage (``loop._restore``)."""
    fs, root = filesystem_for(run_uri, s3)
    path = join(root, RAY_SNAPSHOT)
    data = read_bytes(fs, path)
    if data is None:
        return
    try:
        json.loads(data)
        return
    except ValueError:
        pass
    aside = f"{path}.damaged-{int(time.time())}"
    fs.move(path, aside)
    log.warning("%s: Ray Train's checkpoint snapshot was %s; moved it to %s, the run resumes from its newest "
                "complete checkpoint", run_uri, "empty" if not data else "unreadable", aside)


def _fit(job: TrainJob, plan: RunPlan, callbacks: list | None) -> dict:
    set_aside_damaged_snapshot(plan.run_uri, job.cfg.s3)
    _announce(job, plan)
    cfg = job.cfg
    gpus = cluster_resources()[1]
    if cfg.cluster.use_gpu and gpus < cfg.cluster.num_workers:
        log.info("the cluster has %g GPUs now, the run needs %d: Ray Train's placement group asks the autoscaler "
                 "for them and the workers start once they join", gpus, cfg.cluster.num_workers)
    stage = job.stage(in_process=False)
    pool = start_pool(stage) if stage is not None else None  # for the whole run: every rank, every epoch
    progress = DriverProgress(f"{job.name} {cfg.run.name}", plan.total_steps) if callbacks is None else None
    try:
        with progress or contextlib.nullcontext():
            result = build_trainer(job, plan, callbacks, progress.name if progress else None, pool).fit()
    finally:
        if pool is not None:
            log_pool_stats(stage, pool)
            stop_pool(pool)
    rank0 = stopped_or(result.return_value or {})
    return run_report(job, plan, rank0, result.checkpoint.path if result.checkpoint else None)


def stopped_or(rank0: dict) -> dict:
    """Rank 0's result, or the error it stopped with (every rank stopped at the same step, e.g. a NaN loss)."""
    if "stopped" in rank0:
        raise NonFiniteLoss(rank0["stopped"])
    return rank0


def log_pool_stats(stage: Stage, pool: StagePool) -> None:
    stats = ray.get(pool.stats())
    rows, busy = sum(s["rows"] for s in stats), sum(s["busy_s"] for s in stats)
    log.info("%s: %d actor(s) processed %d rows in %.0f actor-seconds (%.1f rows/s per actor)", stage.name,
             len(stats), rows, busy, rows / busy if busy else 0.0)


def fit_in_process(job: TrainJob, plan: RunPlan, fault: Fault | None = None) -> dict:
    """The same run in this process, without Ray (one rank, on the CPU)."""
    cfg = job.cfg
    if cfg.cluster.num_workers != 1 or cfg.cluster.use_gpu:
        raise ValueError("a run in this process has one CPU worker: set cluster.num_workers=1, cluster.use_gpu=false")
    with Lease(plan.run_uri, cfg.s3, "run").held(), mlflow_run_ends(plan.run_uri, cfg.s3):
        return _fit_in_process(job, plan, fault)


def _fit_in_process(job: TrainJob, plan: RunPlan, fault: Fault | None) -> dict:
    cfg = job.cfg
    _announce(job, plan)
    stage = job.stage(in_process=True)
    runtime = LocalRuntime(plan.run_uri, cfg.s3, cfg.run.keep_checkpoints,
                           threads=max(1, int(cfg.cluster.cpus_per_worker)), stage=stage.work if stage else None)
    rank0 = stopped_or(train_worker(job, plan, runtime, fault) or {})
    steps = stored_checkpoint_steps(plan.run_uri, cfg.s3)
    return run_report(job, plan, rank0, join(plan.run_uri, checkpoint_dir_name(steps[0])) if steps else None)


def run_report(job: TrainJob, plan: RunPlan, rank0: dict, checkpoint: str | None) -> dict:
    cfg = job.cfg
    return {
        "run": cfg.run.name, "job": job.name, "steps": plan.total_steps, "checkpoint": checkpoint,
        "export": join(plan.run_uri, EXPORT_DIR) if cfg.run.export else None,
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

"""The driver side of every Ray Train job: the run's plan, its TorchTrainer, its report.

``pipelines/pretrain.py`` and ``pipelines/contrastive.py`` (and each sweep trial) call
``fit(cfg, task, dataset, plan)``; the workers run ``pipelines/lib/train/loop.py`` with the
named task. Rerunning the same ``run.name`` in the same ``run.storage_path`` resumes from
the last checkpoint (Ray Train restores it; the loop skips the micro-batches consumed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.progress import DriverProgress
from pipelines.lib.ray_setup import cluster_resources
from pipelines.lib.train.config import ClusterConfig, TrainConfig
from pipelines.lib.train.loop import TRAIN_DATASET, train_loop_per_worker
from uta_core import tracking
from uta_core.config import to_dict
from uta_core.data.storage import S3_SCHEME, filesystem_for, is_s3, join, s3_filesystem, write_bytes_atomic

log = logging.getLogger("uta.train")


@dataclass(kw_only=True)
class RunPlan:
    """Run geometry the driver computes once and every worker shares."""

    rows_per_epoch: int | None  # None: the length is set in steps and the rows were not counted
    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    accumulation: int
    run_uri: str  # <storage_path>/<name>: local absolute path or s3://
    mean: list[float] | None = None  # the model's input normalisation (None: set by each worker's teacher)
    std: list[float] | None = None
    teacher: dict[str, Any] | None = None  # where the targets come from (pre-training)
    # Pre-training: the sources each rank reads itself, epoch by epoch (pipelines/lib/pretrain/data.py
    # ``Sources``); None: the job hands Ray Train a dataset to split (the contrastive stage).
    sources: dict[str, Any] | None = None


def make_plan(train: TrainConfig, cluster: ClusterConfig, rows: int | None, run_uri: str, **extra: Any) -> RunPlan:
    """Steps of the run; ``rows`` may be None only when ``train.max_steps`` and ``warmup_steps`` are set."""
    world = cluster.num_workers
    accum = train.accumulation(world)
    if rows is None:
        if train.max_steps is None or train.warmup_steps is None:
            raise ValueError("the run's length needs the row count: set train.max_steps and train.warmup_steps")
        return RunPlan(rows_per_epoch=None, steps_per_epoch=None, total_steps=train.max_steps,
                       warmup_steps=min(train.warmup_steps, train.max_steps - 1), accumulation=accum,
                       run_uri=run_uri, **extra)
    steps_per_epoch = (rows // world) // train.micro_batch // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data has {rows} rows: fewer than one step ({world} workers x {train.micro_batch * accum} rows); "
            "add data or lower train.micro_batch / train.global_batch"
        )
    total, warmup = train.resolve(steps_per_epoch)
    return RunPlan(rows_per_epoch=rows, steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup,
                   accumulation=accum, run_uri=run_uri, **extra)


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


def local_num_cpus(cluster: ClusterConfig) -> int:
    """Logical CPUs for a new local Ray: the workers' plus ``cluster.data_cpus`` for Ray Data."""
    return math.ceil(cluster.num_workers * cluster.cpus_per_worker + cluster.data_cpus)


def save_resolved_config(cfg: Any, plan: RunPlan) -> None:
    fs, root = filesystem_for(plan.run_uri, cfg.s3)
    text = yaml.safe_dump({**to_dict(cfg), "plan": dataclasses.asdict(plan)}, sort_keys=False)
    write_bytes_atomic(fs, join(root, "config.yaml"), text.encode())


def build_trainer(cfg: Any, task: str, dataset: ray.data.Dataset | None, plan: RunPlan,
                  callbacks: list | None = None, progress: str | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; ``callbacks`` (Ray Train ``UserCallback``s) let a sweep listen in;
    ``progress`` names the driver's progress board (``pipelines/lib/progress.py``)."""
    cl = cfg.cluster
    resources = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {})}
    storage_path, storage_fs = cfg.run.storage_path, None
    if is_s3(storage_path):
        storage_path, storage_fs = storage_path[len(S3_SCHEME):], s3_filesystem(cfg.s3)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "config": to_dict(cfg), "plan": dataclasses.asdict(plan),
                           "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=cl.num_workers, use_gpu=cl.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's INFO: its log files
        ),
        datasets={TRAIN_DATASET: dataset} if dataset is not None else None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[TRAIN_DATASET]) if dataset is not None else None,
    )


def fit(cfg: Any, task: str, dataset: ray.data.Dataset | None, plan: RunPlan, callbacks: list | None = None) -> dict:
    """Save the resolved config, train, and return the run's report (rank 0's history + Ray's result).
    A run of its own draws a progress bar; a sweep's trial (``callbacks``) reports to Tune instead."""
    save_resolved_config(cfg, plan)
    log.info("%s: %s rows, %s steps/epoch, %d steps (warm-up %d), accumulation %d, %d workers", plan.run_uri,
             plan.rows_per_epoch if plan.rows_per_epoch is not None else "uncounted",
             plan.steps_per_epoch or "-", plan.total_steps, plan.warmup_steps, plan.accumulation,
             cfg.cluster.num_workers)
    gpus = cluster_resources()[1]
    if cfg.cluster.use_gpu and gpus < cfg.cluster.num_workers:
        log.info("the cluster has %g GPUs now, the run needs %d: Ray Train's placement group asks the autoscaler "
                 "for them and the workers start once they join", gpus, cfg.cluster.num_workers)
    progress = DriverProgress(f"{task} {cfg.run.name}", plan.total_steps) if callbacks is None else None
    with progress or contextlib.nullcontext():
        result = build_trainer(cfg, task, dataset, plan, callbacks, progress.name if progress else None).fit()
    rank0 = result.return_value or {}
    history = rank0.get("history", [])
    return {
        "run": cfg.run.name, "task": task, "steps": plan.total_steps,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": join(plan.run_uri, "export") if cfg.run.export else None,
        "history": history, "metrics": rank0.get("final", {}), "mlflow_run_id": rank0.get("mlflow_run_id"),
        "tracking_uri": cfg.tracking.tracking_uri,
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

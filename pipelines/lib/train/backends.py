"""Where a training run's ranks run: Ray Train's worker group, or this process. One object of either
kind is what ``launch`` takes; nothing else asks where a run happens.

- ``RayTrain``: the configured Ray cluster, or a new local Ray sized for the run's workers, its read
  tasks and its stage pool; a ``TorchTrainer`` whose workers run ``ray_runtime.train_loop_per_worker``;
  the job's stage on a pool of actors for the whole run; work that needs a teacher's device (the
  streamed teacher's setup) as a Ray task with a pool actor's resources. ``callbacks`` make a sweep
  trial's Ray Train callbacks (its reports to Tune) from the run's plan.
- ``InProcess``: one rank in this process, the stage inline, no Ray (tests, profiling).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.lib.progress import DriverProgress
from pipelines.lib.ray_setup import cluster_resources, init_ray
from pipelines.lib.train.config import ClusterConfig, PoolConfig
from pipelines.lib.train.loop import train_worker
from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.ray_runtime import loop_config, train_loop_per_worker
from pipelines.lib.train.runtime import LocalRuntime
from pipelines.lib.train.spec import Stage, TrainJob
from pipelines.lib.train.stage_pool import StagePool, call_on_pool_resources, start_pool, stop_pool
from uta_core.data.storage import S3_SCHEME, is_s3, s3_filesystem
from uta_core.run.folder import RunFolder

log = logging.getLogger("uta.train")


class Backend(Protocol):
    name: str
    on_pool: bool  # the job's stage runs on a pool of actors (else inline, on this process's CPU)

    def session(self, cluster: ClusterConfig, pool: PoolConfig | None) -> contextlib.AbstractContextManager:
        """What the run needs around it (a Ray to run on), for the whole launch."""

    def call(self, pool: PoolConfig, what: str) -> Callable[..., Any]:
        """``call(fn, *args)`` where a stage's work may run (it may need a teacher's device)."""

    def fit(self, job: TrainJob, plan: RunPlan, run: RunFolder) -> dict:
        """Train every rank to ``plan.total_steps`` in ``run`` (held); rank 0's result."""


@dataclass(frozen=True)
class InProcess:
    """The run in this process, one CPU rank, without Ray."""

    name = "in process"
    on_pool = False

    @contextlib.contextmanager
    def session(self, cluster: ClusterConfig, pool: PoolConfig | None) -> Iterator[None]:
        if cluster.num_workers != 1 or cluster.use_gpu:
            raise ValueError("a run in this process has one CPU worker: set cluster.num_workers=1, "
                             "cluster.use_gpu=false")
        yield

    def call(self, pool: PoolConfig, what: str) -> Callable[..., Any]:
        return lambda fn, *args: fn(*args)

    def fit(self, job: TrainJob, plan: RunPlan, run: RunFolder) -> dict:
        cfg = job.cfg
        stage = job.stage(on_pool=False)
        runtime = LocalRuntime(run, cfg.run.keep_checkpoints, threads=max(1, int(cfg.cluster.cpus_per_worker)),
                               stage=stage.work if stage else None)
        return train_worker(job, plan, runtime, run) or {}


@dataclass(frozen=True)
class RayTrain:
    """The run on Ray Train; ``callbacks(plan)``: a sweep trial's Ray Train callbacks (no progress bar then)."""

    callbacks: Callable[[RunPlan], list] | None = None
    name = "Ray Train"
    on_pool = True

    @contextlib.contextmanager
    def session(self, cluster: ClusterConfig, pool: PoolConfig | None) -> Iterator[None]:
        started = init_ray(cluster.address, local_num_cpus(cluster, pool), local_resources(cluster, pool))
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def call(self, pool: PoolConfig, what: str) -> Callable[..., Any]:
        return call_on_pool_resources(pool, what)

    def fit(self, job: TrainJob, plan: RunPlan, run: RunFolder) -> dict:
        cfg = job.cfg
        run.set_aside_damaged_ray_snapshot()
        gpus = cluster_resources()[1]
        if cfg.cluster.use_gpu and gpus < cfg.cluster.num_workers:
            log.info("the cluster has %g GPUs now, the run needs %d: Ray Train's placement group asks the autoscaler "
                     "for them and the workers start once they join", gpus, cfg.cluster.num_workers)
        stage = job.stage(on_pool=True)
        pool = start_pool(stage) if stage is not None else None  # for the whole run: every rank, every epoch
        callbacks = self.callbacks(plan) if self.callbacks else None
        progress = DriverProgress(f"{job.name} {cfg.run.name}", plan.total_steps) if callbacks is None else None
        try:
            with progress or contextlib.nullcontext():
                trainer = build_trainer(job, plan, run, callbacks, progress.name if progress else None, pool)
                result = trainer.fit()
        finally:
            if pool is not None:
                log_pool_stats(stage, pool)
                stop_pool(pool)
        return result.return_value or {}


def build_trainer(job: TrainJob, plan: RunPlan, run: RunFolder, callbacks: list | None, progress: str | None,
                  pool: StagePool | None) -> TorchTrainer:
    """The TorchTrainer of one run, its storage the run folder; ``progress`` names the driver's progress
    board (``pipelines/lib/progress.py``); ``pool``: the actors every worker sends its blocks through."""
    cfg, cl = job.cfg, job.cfg.cluster
    resources = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {}), **cl.worker_resources}
    storage_path, storage_fs = cfg.run.storage_path, None
    if is_s3(storage_path):
        storage_path, storage_fs = storage_path[len(S3_SCHEME):], s3_filesystem(cfg.s3)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(job, plan, run, progress, pool),
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


def log_pool_stats(stage: Stage, pool: StagePool, timeout_s: float = 10.0) -> None:
    """The pool's work since its actors (re)started. An actor whose node is gone (restarting, no node to take
    it) does not answer: the run's summary waits ``timeout_s`` for it, not for ever."""
    refs = pool.stats()
    answered, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    stats = ray.get(answered)
    rows, busy = sum(s["rows"] for s in stats), sum(s["busy_s"] for s in stats)
    silent = len(refs) - len(answered)
    missing = f"; {silent} did not answer (their nodes are gone)" if silent else ""
    log.info("%s: %d actor(s) processed %d rows in %.0f actor-seconds since they started (%.1f rows/s per actor)%s",
             stage.name, len(stats), rows, busy, rows / busy if busy else 0.0, missing)


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

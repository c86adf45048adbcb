"""Pre-training as a function: the target source and plan on the driver (metadata only), the one
training loop on the workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.pretrain.targets import target_source
from pipelines.lib.pretrain.task import AlignmentTask
from pipelines.lib.ray_setup import init_ray
from pipelines.lib.train.plan import RunPlan, make_plan
from pipelines.lib.train.spec import Stage
from pipelines.lib.train.stage_pool import call_on_pool_resources
from pipelines.lib.train.trainer import fit, fit_in_process, local_num_cpus, local_resources, resolve_paths, run_uri
from uta_core.data.stream import SourceReader
from uta_core.models.trained import check_start
from uta_core.targets.source import TargetSource

REPORT_KEYS = ("step", "epoch", "loss", "lr", "images_per_s", "tokens_per_s", "zeroshot_top1", "zeroshot_top5")


@dataclass(frozen=True)
class PretrainJob:
    """What the runner needs of a pre-training run (``pipelines/lib/train/spec.py``)."""

    cfg: PretrainConfig
    source: TargetSource
    teacher: dict[str, Any]  # the target source's provenance of the teacher
    name = "pretrain"
    experiment = "uta-pretrain"
    artifact_name = "student"

    def reader(self, epoch: int) -> SourceReader:
        return self.source.reader(epoch)

    def build_task(self, plan: RunPlan, device: torch.device, rank: int) -> AlignmentTask:
        return AlignmentTask(self.cfg, self.source, self.teacher, device, rank)

    def stage(self, in_process: bool) -> Stage | None:
        pool = self.cfg.stream.pool
        device, threads = ("cpu", None) if in_process else (pool.device, max(1, int(pool.cpus_per_actor)))
        work = self.source.stage(self.cfg.student, device, threads)
        return Stage(work, pool, "teacher pool") if work is not None else None

    def run_tags(self) -> dict[str, str]:
        return {"uta.teacher_mode": self.source.mode}

    def run_params(self) -> dict[str, Any]:
        return {"targets": {"mode": self.source.mode, "teacher": self.teacher}}


def plan_pretrain(cfg: PretrainConfig, in_process: bool = True,
                  source: TargetSource | None = None) -> tuple[PretrainJob, RunPlan]:
    """The run's job and plan: the teacher source's checks (``source``: already made and checked by
    ``target_source``), its sources and their counts (metadata), then the source's start (the
    streamed teacher's setup: in this process, or on a Ray task with a pool actor's resources)."""
    if cfg.init_from:
        check_start(cfg.init_from, cfg.student, cfg.s3)
    source = source or target_source(cfg)
    targets = source.plan()
    plan = make_plan(cfg.train, cfg.cluster, targets.sources, cfg.run.seed, cfg.data.shuffle_files, run_uri(cfg))
    pool = cfg.stream.pool
    call = _here if in_process else call_on_pool_resources(pool, "the teacher's setup")
    source = source.start(cfg.student, plan.run_uri, targets.sources.items, call, "cpu" if in_process else pool.device)
    return PretrainJob(cfg, source, {**targets.teacher, **source.provenance()}), plan


def _here(fn, *args):
    return fn(*args)


def fit_pretrain(cfg: PretrainConfig, callbacks: Callable[[RunPlan], list] | None = None) -> dict:
    """On a connected Ray: plan and train; returns the run report. ``callbacks`` makes the run's
    Ray Train callbacks from its plan (a sweep trial's report to Tune)."""
    job, plan = plan_pretrain(resolve_paths(cfg), in_process=False)
    return fit(job, plan, callbacks(plan) if callbacks else None)


def run(cfg: PretrainConfig, in_process: bool = False) -> dict:
    """Fit on the configured cluster (a new local Ray when none is given), or in this process without
    Ray (one CPU worker); raises if training failed."""
    cfg = resolve_paths(cfg)  # refuses lost or unwritable outputs before Ray starts
    if in_process:
        return fit_in_process(*plan_pretrain(cfg))
    source = target_source(cfg)  # refuses misfits before Ray starts
    pool = cfg.stream.pool if source.teacher_apart else None
    started = init_ray(cfg.cluster.address, local_num_cpus(cfg.cluster, pool), local_resources(cfg.cluster, pool))
    try:
        return fit(*plan_pretrain(cfg, in_process=False, source=source))
    finally:
        if started:
            ray.shutdown()

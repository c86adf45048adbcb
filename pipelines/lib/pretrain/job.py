"""Pre-training as a function: the target source and plan on the driver (metadata only), the one
training loop on the workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.pretrain.targets import target_source
from pipelines.lib.pretrain.task import AlignmentTask
from pipelines.lib.train.backends import Backend, RayTrain
from pipelines.lib.train.launch import launch, resolve_paths
from pipelines.lib.train.plan import RunPlan, make_plan
from pipelines.lib.train.spec import Stage
from uta_core.data.stream import SourceReader
from uta_core.models.trained import check_start
from uta_core.run.folder import RunFolder
from uta_core.targets.source import TargetPlan, TargetSource

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

    def stage(self, on_pool: bool) -> Stage | None:
        pool = self.cfg.stream.pool
        device, threads = (pool.device, max(1, int(pool.cpus_per_actor))) if on_pool else ("cpu", None)
        work = self.source.stage(self.cfg.student, device, threads)
        return Stage(work, pool, "teacher pool") if work is not None else None

    def run_tags(self) -> dict[str, str]:
        return {"uta.teacher_mode": self.source.mode}

    def run_params(self) -> dict[str, Any]:
        return {"targets": {"mode": self.source.mode, "teacher": self.teacher}}

    def training_data(self) -> tuple[str, list[str]]:
        if self.source.mode == "cache":
            return "teacher cache", [self.cfg.data.cache]
        return "image shards", list(self.cfg.data.input.paths)


def plan_pretrain(cfg: PretrainConfig, run: RunFolder, backend: Backend, source: TargetSource | None = None,
                  targets: TargetPlan | None = None) -> tuple[PretrainJob, RunPlan]:
    """The run's job and plan: the teacher source's checks (``source``: already made and checked by
    ``target_source``), its sources and their counts (metadata; ``targets``: already listed), then the
    source's start in the held run folder (the streamed teacher's setup, where ``backend`` runs its stage's
    work)."""
    source = source or target_source(cfg)
    targets = targets or source.plan()
    plan = make_plan(cfg.train, cfg.cluster, targets.sources, cfg.run.seed, cfg.data.shuffle_files, run.uri)
    pool = cfg.stream.pool
    call = backend.call(pool, "the teacher's setup")
    source = source.start(cfg.student, run, targets.sources.items, call, pool.device if backend.on_pool else "cpu")
    return PretrainJob(cfg, source, {**targets.teacher, **source.provenance()}), plan


def run(cfg: PretrainConfig, backend: Backend | None = None) -> dict:
    """Train on ``backend`` (default: Ray Train, on the configured cluster or a new local Ray); raises if
    training failed. Misfits (paths, the student against the teacher or the cache) and missing inputs are
    refused before anything starts: the sources are listed (metadata) before Ray."""
    cfg = resolve_paths(cfg)
    if cfg.init_from:
        check_start(cfg.init_from, cfg.student, cfg.s3)
    source = target_source(cfg)
    targets = source.plan()
    pool = cfg.stream.pool if source.teacher_apart else None
    return launch(cfg, lambda folder, b: plan_pretrain(cfg, folder, b, source, targets), backend or RayTrain(), pool)

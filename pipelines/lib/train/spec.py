"""What a training job hands the runner (torchtitan's ``TrainSpec``): the only thing the loop knows of it.

A job builds one ``TrainJob`` on its driver (its config plus what the driver worked out from
metadata, e.g. the teacher source) and hands it to ``launch.launch``; Ray pickles it to every
worker, where the loop asks it for the rank's reader and for a ``Task``. The loop owns the
mechanics: optimiser and schedule (``cfg.optim``), device placement, DDP and compile of
``task.forward``, autocast, accumulation, clipping, the step, reports, checkpoints, cursors,
MLflow. The task owns the model, the host work of a micro-batch, the loss, evaluation and
the export.

Adding a job: a module with its ``TrainJob`` and ``Task`` (``pipelines/lib/pretrain/job.py`` is
one), and a ``pipelines/<name>.py`` whose ``run`` calls ``launch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipelines.lib.train.config import ClusterConfig, PoolConfig, RunConfig, TrainConfig
from pipelines.lib.train.plan import RunPlan
from uta_core.data.storage import S3Options
from uta_core.data.stream import SourceReader
from uta_core.optim import OptimConfig
from uta_core.tracking import TrackingConfig


class DataOrder(Protocol):
    shuffle_files: bool  # a new source order every epoch (seeded)
    shuffle_buffer: int  # rows permuted together; 0 keeps the sources' order (exact resume)


class Evaluation(Protocol):
    every: int  # optimiser steps between evaluations; 0: at the end only


class JobConfig(Protocol):
    """The sections of a job's config the loop reads (every job config has them)."""

    run: RunConfig
    cluster: ClusterConfig
    train: TrainConfig
    optim: OptimConfig
    tracking: TrackingConfig
    s3: S3Options
    data: DataOrder
    eval: Evaluation


class Task(Protocol):
    """One worker's model side of a job, built on the worker by ``TrainJob.build_task``."""

    model: nn.Module  # what trains (on the CPU when built); a checkpoint's "model"
    forward: nn.Module  # a module around ``model`` that ``loss`` calls; the loop places, wraps (DDP) and compiles it
    tokens_per_image: int | None  # tokens through the image tower, for tokens/s; None: not reported

    def prepare(self, batch: dict[str, np.ndarray], step: int, micro: int) -> dict[str, Any]:
        """Host work for micro-batch ``micro`` of optimiser step ``step``: tensors (pinned on a GPU worker)
        and the step's random draws. Runs on the loop's prefetch thread: it must not touch the model."""

    def loss(self, forward: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """One prepared micro-batch's loss (0-d, on the device), through ``forward`` (the prepared module)."""

    def after_step(self) -> dict[str, torch.Tensor]:
        """After each optimiser step (e.g. clamp the temperature); metrics to log, as 0-d tensors."""

    def evaluate(self) -> dict[str, float]:
        """Rank 0: evaluation metrics (empty when the job evaluates nothing)."""

    def export(self, folder: Path, step: int) -> None:
        """Rank 0: write the trained model, ready to use, into ``folder``."""

    def meta(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights to use the model (input mean/std, the teacher)."""

    def on_run_start(self, log_artifact) -> None:
        """Rank 0, a new MLflow run: log what describes the run (e.g. the masking map)."""

    def describe(self) -> str:
        """A short title for plots."""


class BlockWork(Protocol):
    """Picklable; ``open()`` builds the work in the process that runs it (e.g. loads a teacher) and
    returns ``block (numpy columns) -> extra columns``; the same block always gives the same columns."""

    def open(self) -> Any: ...


@dataclass(frozen=True)
class Stage:
    """Work on every block between a rank's reads and its steps that runs apart from the trainers:
    a pool of actors on a cluster (``stage_pool.py``), inline in a run without Ray."""

    work: BlockWork
    pool: PoolConfig
    name: str  # what the console calls the pool, e.g. "teacher pool"


class TrainJob(Protocol):
    """A training job as the runner sees it; small and picklable (no model, no data)."""

    name: str  # MLflow tag ``job``; the run's source is ``pipelines/<name>.py``
    experiment: str  # the default MLflow experiment
    artifact_name: str  # MLflow artefact folder of the export
    cfg: JobConfig

    def reader(self, epoch: int) -> SourceReader:
        """Reads one of ``plan.sources`` in ``epoch`` (in a read task)."""

    def build_task(self, plan: RunPlan, device: torch.device, rank: int) -> Task:
        """This worker's task (model on the CPU; the loop places it)."""

    def stage(self, on_pool: bool) -> Stage | None:
        """The job's stage, if it has one: built for its pool's devices (``on_pool``, a Ray backend), else
        for the CPU of this process (the in-process backend runs it inline)."""

    def run_tags(self) -> dict[str, str]:
        """MLflow tags of a new run."""

    def run_params(self) -> dict[str, Any]:
        """MLflow params of a new run beyond the config (e.g. the teacher's provenance)."""

    def training_data(self) -> tuple[str, list[str]]:
        """(name, URIs) of what the run trains on, for its MLflow dataset (the sources' listing is its digest)."""

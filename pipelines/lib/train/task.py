"""What a training job plugs into the one Ray Train loop: the model side of a run.

The loop (``loop.py``) owns data order, resume, checkpoints, reports and MLflow; a task owns
its model, optimiser, schedule, one optimiser step, its evaluation and its export. Tasks are
named in ``TASKS`` and imported inside the worker, so the driver never builds a model.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

TASKS = {  # name -> (task class, job config class)
    "pretrain": ("pipelines.lib.pretrain.task:AlignmentTask", "pipelines.lib.pretrain.config:PretrainConfig"),
    "contrastive": ("pipelines.lib.contrastive.task:ContrastiveTask",
                    "pipelines.lib.contrastive.config:ContrastiveJobConfig"),
}


class TrainTask(Protocol):
    experiment: str  # default MLflow experiment
    artifact_name: str  # MLflow artefact folder of the export
    model: nn.Module  # what a checkpoint's "model" holds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    images_per_step: int  # per rank
    tokens_per_image: int | None  # student tokens through the blocks, for tokens/s; None: not a token model
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prepare(self, batch: dict[str, np.ndarray], step: int, micro: int) -> dict[str, Any]:
        """Host work for micro-batch ``micro`` of optimiser step ``step``: tensors (pinned on a GPU
        worker) and the step's random draws (masks, crops). Runs on the loop's prefetch thread,
        ahead of ``step``: it must not touch the model or the device."""

    def step(self, group: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        """One optimiser step on ``accumulation`` prepared micro-batches; returns at least loss and
        grad_norm (0-d device tensors: the loop reads them only when it logs, so steps do not wait
        for the GPU)."""

    def evaluate(self) -> dict[str, float]:
        """Rank 0: evaluation metrics (empty when the job evaluates nothing)."""

    def export(self, folder: Path, step: int) -> None:
        """Rank 0: write the final model, ready to use, into ``folder``."""

    def on_run_start(self, log_artifact) -> None:
        """Rank 0, a new MLflow run: log what describes the run (e.g. the masking map)."""

    def describe(self) -> str:
        """A short title for plots."""

    def run_tags(self) -> dict[str, str]:
        """MLflow tags of a new run (e.g. the teacher mode)."""


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def task_config_class(name: str) -> type:
    return _load(TASKS[name][1])


def build_task(name: str, cfg: Any, plan: Any, device: torch.device, rank: int) -> TrainTask:
    return _load(TASKS[name][0])(cfg, plan, device, rank)

"""The training state, saved and loaded in one place.

A checkpoint folder ``<run>/checkpoint_<step>`` holds one file, ``state.pt``:

    model       state dict of what trains (a UTAStudent, or a CLIP in the contrastive stage)
    optimizer   AdamW state          scheduler   LambdaLR state
    position    Position: steps done, epoch, micro-batches consumed in it, every rank's cursor,
                the MLflow run id
    config      the job config, as a dict (``uta_core.config.to_dict``)
    plan        the run geometry the driver computed (steps, warm-up, accumulation)
    meta        what the job needs to use the model: input mean/std, the teacher (pre-training)

Resuming a run goes through here; using a trained model goes through ``uta_core.models.trained``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uta_core.data.storage import S3Options, filesystem_for, join, list_dir, read_bytes
from uta_core.models.trained import STATE_FILE

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{7})")  # checkpoint_<step>, as the training loop names them

log = logging.getLogger("uta.checkpoint")


@dataclass(kw_only=True)
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches each rank consumed in ``epoch``
    cursors: list[dict] | None = None  # per rank: its place in the epoch's stream (uta_core.data.epochs.Cursor)
    mlflow_run_id: str | None = None
    resumed: bool = False


def training_state(model: nn.Module, optimizer, scheduler, position: Position, config: dict, plan: dict,
                   meta: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": dataclasses.asdict(position),
        "config": config,
        "plan": plan,
        "meta": meta,
    }


def save_state(state: dict[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    return path


def state_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def restore(state: dict[str, Any], model: nn.Module, optimizer, scheduler) -> Position:
    """Load model, optimiser and scheduler in place; the position to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**{**state["position"], "resumed": True})


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def stored_checkpoint_steps(run_uri: str, s3: S3Options) -> list[int]:
    """Steps of the checkpoint folders under a run folder that hold a state file, newest first."""
    fs, root = filesystem_for(run_uri, s3)
    steps = []
    for info in list_dir(fs, root, recursive=False, s3=s3):
        match = CHECKPOINT_DIR.fullmatch(info.path.rsplit("/", 1)[-1])
        if match and fs.get_file_info(join(info.path, STATE_FILE)).is_file:
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def load_stored_state(run_uri: str, step: int, s3: S3Options) -> dict[str, Any] | None:
    """The state of ``<run>/checkpoint_<step>``; None when it cannot be read whole (a killed upload)."""
    fs, root = filesystem_for(run_uri, s3)
    data = read_bytes(fs, join(root, checkpoint_dir_name(step), STATE_FILE))
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False) if data else None
    except (RuntimeError, EOFError, ValueError) as err:  # truncated or corrupt
        log.warning("%s/%s is unreadable (%s); trying an older checkpoint", run_uri, checkpoint_dir_name(step), err)
        return None

"""The training state, saved and loaded in one place.

A checkpoint folder holds one file, ``state.pt``:

    model       state dict of what trains (a UTAStudent, or a CLIP in the contrastive stage)
    optimizer   AdamW state          scheduler   LambdaLR state
    position    Position: steps done, epoch, micro-batches consumed in it, the MLflow run id
    config      the job config, as a dict (``uta_core.config.to_dict``)
    plan        the run geometry the driver computed (steps, warm-up, mean/std, teacher)

Everything that resumes a run, evaluates a checkpoint or exports from one goes through here.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uta_core.config import from_dict
from uta_core.data.storage import S3Options, filesystem_for, join, list_dir, read_bytes
from uta_core.models.export import UTA_CONFIG, load_student
from uta_core.models.official import is_official_state, load_official_student
from uta_core.models.student import StudentConfig, UTAStudent

STATE_FILE = "state.pt"
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


def training_state(model: nn.Module, optimizer, scheduler, position: Position, config: dict, plan: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": dataclasses.asdict(position),
        "config": config,
        "plan": plan,
    }


def save_state(state: dict[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def restore(state: dict[str, Any], model: nn.Module, optimizer, scheduler) -> Position:
    """Load model, optimiser and scheduler in place; the position to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**{**state["position"], "resumed": True})


def _state_from_bytes(data: bytes) -> dict[str, Any]:
    """A state file's contents, onto the CPU (a GPU worker's checkpoint loads on a CPU-only driver)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


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
        return _state_from_bytes(data) if data else None
    except (RuntimeError, EOFError, ValueError) as err:  # truncated or corrupt
        log.warning("%s/%s is unreadable (%s); trying an older checkpoint", run_uri, checkpoint_dir_name(step), err)
        return None


def student_from_state(state: dict[str, Any]) -> tuple[UTAStudent, tuple, tuple, dict]:
    """A pre-training checkpoint's student (eval mode), its mean/std and step."""
    student = UTAStudent(from_dict(StudentConfig, state["config"]["student"]))
    student.load_state_dict(state["model"])
    plan = state["plan"]
    return student.eval(), tuple(plan["mean"]), tuple(plan["std"]), {"step": state["position"]["step"],
                                                                     "teacher": plan.get("teacher")}


def load_trained_student(uri: str, s3: S3Options) -> tuple[UTAStudent, tuple, tuple, dict]:
    """A student from an export, a training checkpoint, a run folder or a released UTA
    checkpoint file (local or s3://) -> (student, mean, std, info)."""
    fs, root = filesystem_for(uri, s3)
    if fs.get_file_info(root).is_file:
        return _official_student_file(uri, read_bytes(fs, root))
    names = {info.path.rsplit("/", 1)[-1] for info in list_dir(fs, root, recursive=False, s3=s3)}
    if not names:
        raise ValueError(f"model={uri} does not exist or is empty")
    if STATE_FILE in names:  # a Ray Train checkpoint of pipelines/pretrain.py
        state = _state_from_bytes(read_bytes(fs, join(root, STATE_FILE)))
        if "student" not in state["config"]:
            raise ValueError(f"model={uri} is a checkpoint of another job (no student); pass a pre-training run")
        return student_from_state(state)
    if UTA_CONFIG in names:  # an export folder
        with tempfile.TemporaryDirectory(prefix="uta-eval-") as folder:
            for name in names:
                data = read_bytes(fs, join(root, name))
                if data is not None:
                    (Path(folder) / name).write_bytes(data)
            student, meta = load_student(folder)
        return student, tuple(meta["mean"]), tuple(meta["std"]), {"step": meta.get("step"),
                                                                  "teacher": meta.get("teacher")}
    if "export" in names:  # a run folder
        return load_trained_student(join(uri, "export"), s3)
    raise ValueError(
        f"model={uri} is neither a student export ({UTA_CONFIG}), a checkpoint ({STATE_FILE}), a run folder "
        "nor a released UTA checkpoint file"
    )


def _official_student_file(uri: str, data: bytes) -> tuple[UTAStudent, tuple, tuple, dict]:
    """A released UTA checkpoint (github jihaonew/UTA): its image tower + head as the student."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a readable weights file
        raise ValueError(f"model={uri} is a file but not a torch weights file torch.load can read ({err})") from None
    if not isinstance(state, dict) or not is_official_state(state):
        raise ValueError(f"model={uri} is a torch file without visual.* keys: not a released UTA checkpoint")
    ckpt = load_official_student(state)  # OfficialCheckpointError is a ValueError naming the key
    return ckpt.student, ckpt.mean, ckpt.std, {"step": None, "official": True}

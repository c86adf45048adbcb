"""A trained student from any of its forms, in one place: an export folder, a training checkpoint
(``state.pt``), a run folder (its export), or a released UTA checkpoint file (github jihaonew/UTA);
local or ``s3://``. ``evaluate.py``, ``export.py`` and stage 2 load students through here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from uta_core.checkpoint import RECORD_FILE, STATE_FILE, read_checkpoint, safe_load
from uta_core.config import from_dict
from uta_core.data.storage import S3Options, filesystem_for, join, list_dir, read_bytes
from uta_core.models.export import HEAD_WEIGHTS, TIMM_WEIGHTS, UTA_CONFIG
from uta_core.models.official import is_official_state, load_official_student, official_config_of_file
from uta_core.models.student import StudentConfig, UTAStudent
from uta_core.run.folder import EXPORT_DIR, RunFolder

Loaded = tuple[UTAStudent, tuple, tuple, dict]  # (student in eval mode, mean, std, info)


def load_export(export_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[UTAStudent, dict]:
    """Rebuild ``UTAStudent`` (trunk + head) from a local export; returns it (eval mode) and its metadata."""
    src = Path(export_dir)
    meta_path = src / UTA_CONFIG
    if not meta_path.is_file():
        raise ValueError(f"{str(src)!r} is not a student export: {UTA_CONFIG} is missing")
    meta = json.loads(meta_path.read_text())
    student = UTAStudent(from_dict(StudentConfig, meta["student"]))
    student.trunk.load_state_dict(load_file(src / TIMM_WEIGHTS, device=str(map_location)))
    student.head.load_state_dict(load_file(src / HEAD_WEIGHTS, device=str(map_location)))
    return student.eval(), meta


def student_from_state(state: dict[str, Any]) -> Loaded:
    """A pre-training checkpoint's student (eval mode), its mean/std, step and teacher."""
    student = UTAStudent(from_dict(StudentConfig, state["config"]["student"]))
    student.load_state_dict(state["model"])
    meta = state.get("meta") or state["plan"]  # checkpoints of earlier versions kept mean/std in the plan
    info = {"step": state["position"]["step"], "teacher": meta.get("teacher")}
    return student.eval(), tuple(meta["mean"]), tuple(meta["std"]), info


def load_trained_student(uri: str, s3: S3Options) -> Loaded:
    """A student from an export, a training checkpoint, a run folder or a released UTA checkpoint file."""
    fs, root = filesystem_for(uri, s3)
    if fs.get_file_info(root).is_file:
        return _official_student_file(uri, read_bytes(fs, root))
    names = {info.path.rsplit("/", 1)[-1] for info in list_dir(fs, root, recursive=False, s3=s3)}
    if not names:
        raise ValueError(f"model={uri} does not exist or is empty")
    if STATE_FILE in names or RECORD_FILE in names:  # a training checkpoint: verified, loaded without pickle
        state = read_checkpoint(fs, root)
        if "student" not in state["config"]:
            raise ValueError(f"model={uri} is a checkpoint of another job (no student); pass a pre-training run")
        return student_from_state(state)
    if UTA_CONFIG in names:  # an export folder
        with tempfile.TemporaryDirectory(prefix="uta-eval-") as folder:
            for name in names:
                data = read_bytes(fs, join(root, name))
                if data is not None:
                    (Path(folder) / name).write_bytes(data)
            student, meta = load_export(folder)
        return student, tuple(meta["mean"]), tuple(meta["std"]), {"step": meta.get("step"),
                                                                  "teacher": meta.get("teacher")}
    if EXPORT_DIR in names:  # a run folder
        return load_trained_student(RunFolder(uri, s3).export_uri, s3)
    raise ValueError(f"model={uri} is neither a student export ({UTA_CONFIG}), a checkpoint ({STATE_FILE}), a run "
                     "folder nor a released UTA checkpoint file")


def _official_student_file(uri: str, data: bytes) -> Loaded:
    """A released UTA checkpoint: its image tower + head as the student; its own text tower (``text_state``)
    and ``logit_scale`` ride along in the info."""
    state = safe_load(data, f"model={uri}")  # a released file is weights only: nothing in it runs
    if not isinstance(state, dict) or not is_official_state(state):
        raise ValueError(f"model={uri} is a torch file without visual.* keys: not a released UTA checkpoint")
    ckpt = load_official_student(state)  # OfficialCheckpointError is a ValueError naming the key
    return ckpt.student, ckpt.mean, ckpt.std, {"step": None, "official": True, "text_state": ckpt.text_state,
                                               "logit_scale": ckpt.logit_scale}


# --------------------------------------------------------------------- starting a run from a student
ARCHITECTURE = ("variant", "img_size", "patch_size", "out_dim", "rope_ref_grid", "overrides")


def architecture_differences(given: StudentConfig, start: StudentConfig) -> list[str]:
    """``student.<key>=<start's value>`` for every architecture setting where ``given`` differs."""
    return [f"student.{k}={getattr(start, k)!r}" for k in ARCHITECTURE if getattr(given, k) != getattr(start, k)]


def _refuse_other_architecture(uri: str, given: StudentConfig, start: StudentConfig) -> None:
    wrong = architecture_differences(given, start)
    if wrong:
        raise ValueError(f"init_from={uri} is another architecture than student.*: set {' '.join(wrong)}")


def check_start(uri: str, given: StudentConfig, s3: S3Options) -> None:
    """Before any worker starts: an export's ``uta_student.json``, a local released file's weight shapes
    (memory-mapped, not read), or a checkpoint, verified and loaded without pickle here (a damaged or unsafe
    one is refused before any worker loads it). Other forms are checked where they are loaded."""
    fs, root = filesystem_for(uri, s3)
    info = fs.get_file_info(root)
    if info.is_file and "://" not in uri:
        start = official_config_of_file(uri)
        if start is not None:
            _refuse_other_architecture(uri, given, start)
        return
    if info.is_file:
        return
    meta = read_bytes(fs, join(root, UTA_CONFIG))
    if meta is not None:
        _refuse_other_architecture(uri, given, from_dict(StudentConfig, json.loads(meta)["student"]))
    elif any(fs.get_file_info(join(root, name)).is_file for name in (RECORD_FILE, STATE_FILE)):
        _refuse_other_architecture(uri, given, student_from_state(read_checkpoint(fs, root))[0].cfg)


def start_weights(uri: str, given: StudentConfig, s3: S3Options) -> dict[str, torch.Tensor]:
    """The weights a run starts from: any trained student (``load_trained_student``) of ``given``'s
    architecture; the [MASK] token only where it has one."""
    student, _, _, _ = load_trained_student(uri, s3)
    _refuse_other_architecture(uri, given, student.cfg)
    return student.state_dict()

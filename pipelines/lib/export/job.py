"""One local folder that timm, open_clip, clip_benchmark and MLflow load, from any trained student.

The student comes from an export, a checkpoint or a run folder (local or ``s3://``), or a released
UTA checkpoint file (``uta_core.models.trained.load_trained_student``); the text tower from the
teacher the run recorded, or the one given, or (a released UTA checkpoint) its own ``text.*``
(``uta_core.models.official_text``). The folder is a timm ``local-dir:`` model and an
open_clip ``local-dir:`` CLIP (``uta_core.models.open_clip_export``). Given a local export as
``model`` and no ``output``, the export's open_clip config is pointed at where the folder now is
(after a copy or a download).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.lib.destinations import check_tracking
from uta_core import tracking
from uta_core.config import SettingError
from uta_core.data.storage import S3Options, is_s3
from uta_core.models.export import UTA_CONFIG, export_student
from uta_core.models.mlflow_model import log_student_model
from uta_core.models.official_text import official_text_config, official_text_weights
from uta_core.models.open_clip_export import link_open_clip, write_open_clip, write_open_clip_files
from uta_core.models.teacher import TeacherConfig, build_teacher
from uta_core.models.trained import load_trained_student
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.export")


@dataclass(kw_only=True)
class ExportConfig:
    model: str | None = None  # export / checkpoint / run folder or released UTA file; local or s3://
    output: str | None = None  # a local folder; null: relink `model` (a local export folder) in place
    teacher: TeacherConfig | None = None  # the text tower; null: the teacher the run recorded
    teacher_random_seed: int | None = None  # int: allow a random-init text tower (tests)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if not self.model:
            raise SettingError("model", "export needs {key}=<export, checkpoint or run folder, or a UTA checkpoint "
                                        "file>")
        if self.output is not None and is_s3(self.output):
            raise ValueError(f"output={self.output} must be a local folder: open_clip and timm load local folders")


def relink(folder: Path) -> dict:
    if not (folder / UTA_CONFIG).is_file():
        raise ValueError(f"model={folder} is not a student export ({UTA_CONFIG} missing); give output=<folder>")
    if not link_open_clip(folder):
        raise ValueError(f"{folder} has no open_clip files; write them with output=<new folder>")
    return {"output": str(folder), "open_clip": f"local-dir:{folder.resolve()}", "relinked": True}


def run(cfg: ExportConfig) -> dict:
    if cfg.output is None:
        return relink(Path(cfg.model))
    out = Path(cfg.output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output={out} exists and is not empty; choose a new folder")
    check_tracking(cfg.tracking)
    student, mean, std, info = load_trained_student(cfg.model, cfg.s3)
    recorded = info.get("teacher") or {}
    own_text = info.get("text_state") if cfg.teacher is None else None  # a released model's own text tower
    teacher_cfg = cfg.teacher or (TeacherConfig(arch=recorded["arch"], pretrained=recorded.get("pretrained"))
                                  if recorded.get("arch") else None)
    if teacher_cfg is None and not own_text:
        raise ValueError(f"model={cfg.model} records no teacher: give teacher.arch (+ teacher.pretrained), "
                         "the CLIP whose text tower goes with the student")
    export_student(student, out, mean=mean, std=std,
                   extra={"source": cfg.model, "step": info.get("step"), "teacher": recorded or None})
    if own_text:
        write_open_clip_files(out, official_text_weights(own_text, info.get("logit_scale")),
                              official_text_config(own_text), {"text_tower": f"{cfg.model} (its own text.*)"})
        text_tower = "the checkpoint's own"
    else:
        teacher = build_teacher(teacher_cfg, random_seed=cfg.teacher_random_seed, s3=cfg.s3)
        write_open_clip(out, teacher.model, teacher.arch, teacher.pretrained)
        text_tower = teacher_cfg.arch
    result = {"output": str(out), "timm": f"local-dir:{out.resolve()}", "open_clip": f"local-dir:{out.resolve()}",
              "teacher": text_tower}
    if cfg.tracking.enabled:
        with tracking.start_run(cfg.tracking, "uta-export", run_name=cfg.tracking.run_name or out.name,
                                tags={"job": "export"}, source="pipelines/export.py") as mlrun:
            tracking.log_config(cfg)
            model = log_student_model(out, register_as=cfg.tracking.register_as)
            result |= {"mlflow_run_id": mlrun.info.run_id, "mlflow_model_uri": model.model_uri,
                       "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}
    return result

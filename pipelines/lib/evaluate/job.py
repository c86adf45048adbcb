"""Zero-shot evaluation of a trained student, and the classifier file training uses.

``model`` is a student export folder, a pre-training checkpoint folder or a run folder
(``uta_core.checkpoint.load_trained_student``); the classifier is the teacher's text tower
applied once to class names x templates, so a cache-mode run never builds a teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pipelines.lib.destinations import check_output, check_tracking
from uta_core import tracking
from uta_core.device import require_cuda
from uta_core.checkpoint import load_trained_student
from uta_core.data.rows import load_eval_set
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.eval.evaluator import load_classifier, prompts, save_classifier, teacher_classifier, zeroshot_accuracy
from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.evaluate")


@dataclass(kw_only=True)
class EvaluateConfig:
    model: str | None = None  # export folder, checkpoint folder or run folder (local or s3://)
    input: InputConfig | None = None  # labelled eval shards
    classifier_path: str | None = None  # zeroshot: read; build-classifier: see `output`
    output: str | None = None  # build-classifier: where the classifier file goes
    teacher: TeacherConfig | None = None  # to build a classifier (its text tower)
    teacher_random_seed: int | None = None  # int: allow random-init teacher weights (tests)
    prompts: str | None = None  # built-in prompt set, e.g. imagenet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 10000
    batch_size: int = 64
    device: str = "auto"  # auto: cuda when available
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("max_images and batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be auto, cpu or cuda")


def resolve_device(device: str) -> str:
    if device == "cuda":
        try:
            require_cuda("device=cuda")
        except RuntimeError as err:  # on the driver: the user's to fix, one line
            raise ValueError(str(err)) from None
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _teacher(cfg: EvaluateConfig, device: str) -> Teacher:
    if cfg.teacher is None:
        raise ValueError("building a classifier needs teacher.arch (+ teacher.pretrained): the text tower")
    return build_teacher(cfg.teacher, random_seed=cfg.teacher_random_seed, device=device, s3=cfg.s3)


def build_classifier_file(cfg: EvaluateConfig) -> dict:
    """Write ``cfg.output``: the teacher's zero-shot classifier for the configured prompts."""
    if not cfg.output:
        raise ValueError("build-classifier needs output=<path or s3:// URI> for the classifier file")
    check_output("output", cfg.output, file=True)
    names, templates = prompts(cfg.prompts, cfg.classnames, cfg.templates)
    classifier = teacher_classifier(_teacher(cfg, resolve_device(cfg.device)), names, templates)
    save_classifier(classifier, cfg.output, cfg.s3)
    return {"output": cfg.output, "classes": len(names), "templates": len(templates),
            "dim": int(classifier["weights"].shape[0])}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Zero-shot top-1/5 of ``cfg.model`` on ``cfg.input``; logged to MLflow."""
    if not cfg.model or cfg.input is None:
        raise ValueError("zeroshot needs model=<export/checkpoint/run folder> and input.paths=<labelled shards>")
    check_tracking(cfg.tracking)
    device = resolve_device(cfg.device)
    student, mean, std, info = load_trained_student(cfg.model, cfg.s3)
    student.to(device)
    if cfg.classifier_path:
        weights_DC = load_classifier(cfg.classifier_path, cfg.s3)["weights"]
    else:
        names, templates = prompts(cfg.prompts, cfg.classnames, cfg.templates)
        weights_DC = teacher_classifier(_teacher(cfg, device), names, templates)["weights"]
    pixels, labels = load_eval_set(cfg.input, cfg.s3, student.cfg.img_size, cfg.max_images)
    metrics = zeroshot_accuracy(student, pixels, labels, weights_DC, mean, std, batch_size=cfg.batch_size,
                                device=device)
    metrics["images"] = int(labels.numel())
    with tracking.start_run(cfg.tracking, "uta-evaluate", tags={"job": "evaluate"},
                            source="pipelines/evaluate.py") as run:
        tracking.log_config(cfg)
        tracking.log_metrics(metrics)
        run_id = run.info.run_id if run is not None else None
    return {"model": cfg.model, **info, **metrics, "mlflow_run_id": run_id}

"""Zero-shot evaluation of a trained student (classification and retrieval), and the classifier
file training uses.

``model`` is a student export folder, a pre-training checkpoint folder or a run folder
(``uta_core.models.trained.load_trained_student``); the classifier is the teacher's text tower
applied once to class names x templates (and, with ``retrieval_input``, to the eval captions),
so a cache-mode run never builds a teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipelines.lib.destinations import check_output, check_tracking
from uta_core import tracking
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.device import require_cuda
from uta_core.eval.data import load_caption_set, load_eval_set
from uta_core.eval.evaluator import (
    RECALL_KS,
    caption_bank,
    eval_caption_bank,
    load_classifier,
    prompts,
    retrieval_metrics,
    save_classifier,
    teacher_classifier,
    zeroshot_accuracy,
)
from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher
from uta_core.models.trained import load_trained_student
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.evaluate")


@dataclass(kw_only=True)
class EvaluateConfig:
    model: str | None = None  # export folder, checkpoint folder or run folder (local or s3://)
    input: InputConfig | None = None  # labelled eval shards (zero-shot classification)
    retrieval_input: InputConfig | None = None  # captioned eval shards (image <-> text recall@1/5/10)
    classifier_path: str | None = None  # zeroshot: read; build-classifier: see `output`
    output: str | None = None  # build-classifier: where the classifier file goes
    teacher: TeacherConfig | None = None  # to build a classifier (its text tower)
    teacher_random_seed: int | None = None  # int: allow random-init teacher weights (tests)
    prompts: str | None = None  # built-in prompt set, e.g. imagenet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 10000
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
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
    teacher = _teacher(cfg, resolve_device(cfg.device))
    classifier = teacher_classifier(teacher, names, templates)
    if cfg.retrieval_input is not None:
        _, captions = load_caption_set(cfg.retrieval_input, cfg.s3, teacher.image_size, cfg.max_images)
        classifier["captions"] = caption_bank(teacher.encode_text, captions)
    save_classifier(classifier, cfg.output, cfg.s3)
    return {"output": cfg.output, "classes": len(names), "templates": len(templates),
            "dim": int(classifier["weights"].shape[0]),
            "caption_texts": len(classifier.get("captions", {}).get("texts", []))}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Zero-shot top-1/5 on ``cfg.input`` and retrieval recall@1/5/10 on ``cfg.retrieval_input``
    of ``cfg.model``; logged to MLflow (metrics + a retrieval table)."""
    if not cfg.model or (cfg.input is None and cfg.retrieval_input is None):
        raise ValueError("zeroshot needs model=<export/checkpoint/run folder> and input.paths=<labelled shards> "
                         "and/or retrieval_input.paths=<captioned shards>")
    check_tracking(cfg.tracking)
    device = resolve_device(cfg.device)
    student, mean, std, info = load_trained_student(cfg.model, cfg.s3)
    student.to(device)
    classifier = load_classifier(cfg.classifier_path, cfg.s3) if cfg.classifier_path else {}
    needs_teacher = not classifier or (cfg.retrieval_input is not None and "captions" not in classifier)
    teacher = _teacher(cfg, device) if needs_teacher else None
    metrics: dict[str, float] = {}
    if cfg.input is not None:
        if "weights" in classifier:
            weights_DC = classifier["weights"]
        else:
            names, templates = prompts(cfg.prompts, cfg.classnames, cfg.templates)
            weights_DC = teacher_classifier(teacher, names, templates)["weights"]
        pixels, labels = load_eval_set(cfg.input, cfg.s3, student.cfg.img_size, cfg.max_images)
        metrics |= zeroshot_accuracy(student, pixels, labels, weights_DC, mean, std, batch_size=cfg.batch_size,
                                     device=device)
        metrics["images"] = int(labels.numel())
    if cfg.retrieval_input is not None:
        pixels, captions = load_caption_set(cfg.retrieval_input, cfg.s3, student.cfg.img_size, cfg.max_images)
        metrics |= retrieval_metrics(student, pixels, captions, eval_caption_bank(classifier, teacher, captions),
                                     mean, std, batch_size=cfg.batch_size, device=device)
        metrics["retrieval_images"], metrics["retrieval_texts"] = len(captions), len(set(captions))
    with tracking.start_run(cfg.tracking, "uta-evaluate", tags={"job": "evaluate"},
                            source="pipelines/evaluate.py") as run:
        tracking.log_config(cfg)
        tracking.log_metrics(metrics)
        if cfg.retrieval_input is not None:
            tracking.log_table(retrieval_table(metrics), "retrieval.json")
        run_id = run.info.run_id if run is not None else None
    return {"model": cfg.model, **info, **metrics, "mlflow_run_id": run_id,
            "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}


def retrieval_table(metrics: dict[str, float]) -> dict[str, list]:
    """Recall@k as a two-row table (image->text, text->image) for MLflow's table view."""
    table: dict[str, list] = {"direction": ["image -> text", "text -> image"]}
    for k in RECALL_KS:
        table[f"R@{k}"] = [metrics[f"retrieval_i2t_r{k}"], metrics[f"retrieval_t2i_r{k}"]]
    return table

"""Zero-shot evaluation of a trained student (classification and retrieval), and the classifier
file training uses.

``model`` is a student export folder, a pre-training checkpoint folder or a run folder
(``uta_core.models.trained.load_trained_student``); the classifier is the teacher's text tower
applied once to class names x templates (and, with ``retrieval_input``, to the eval captions),
so a cache-mode run never builds a teacher.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import ray
import torch

from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.evaluate.stream import Encoder, EvalSet, embed
from pipelines.lib.ray_setup import cluster_resources, init_ray
from uta_core import tracking
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.device import require_cuda
from uta_core.eval.data import load_caption_set
from uta_core.eval.evaluator import (
    RECALL_KS,
    caption_bank,
    eval_caption_bank,
    load_classifier,
    prompts,
    retrieval_of_embeddings,
    save_classifier,
    teacher_classifier,
    zeroshot_of_embeddings,
)
from uta_core.eval.zeroshot import build_classifier
from uta_core.models.official_text import official_text_encoder
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
    classes: str | None = None  # a built-in set of class names + templates, e.g. imagenet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int | None = None  # zeroshot: a cap (the first images encoded); null: every image
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster (or this machine) has one
    address: str | None = None  # zeroshot's Ray: a cluster; null: $RAY_ADDRESS, else a local Ray
    actors: int | None = None  # zeroshot: encoder actors (one GPU each); null: the cluster's GPUs, or 1 on CPUs
    threads: int | None = None  # torch threads of a CPU encoder actor; null: the machine's cores
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if (self.max_images is not None and self.max_images < 1) or self.batch_size < 1:
            raise ValueError("max_images (or null) and batch_size must be >= 1")
        if (self.actors is not None and self.actors < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("actors and threads must be >= 1 (or null)")
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
    names, templates = prompts(cfg.classes, cfg.classnames, cfg.templates)
    teacher = _teacher(cfg, resolve_device(cfg.device))
    classifier = teacher_classifier(teacher, names, templates)
    if cfg.retrieval_input is not None:
        _, captions = load_caption_set(cfg.retrieval_input, cfg.s3, teacher.image_size, cfg.max_images or sys.maxsize)
        classifier["captions"] = caption_bank(teacher.encode_text, captions)
    save_classifier(classifier, cfg.output, cfg.s3)
    return {"output": cfg.output, "classes": len(names), "templates": len(templates),
            "dim": int(classifier["weights"].shape[0]),
            "caption_texts": len(classifier.get("captions", {}).get("texts", []))}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Zero-shot top-1/5 on ``cfg.input`` and retrieval recall@1/5/10 on ``cfg.retrieval_input``
    of ``cfg.model``, streamed through Ray Data (``stream.embed``); logged to MLflow (metrics + a
    retrieval table)."""
    if not cfg.model or (cfg.input is None and cfg.retrieval_input is None):
        raise ValueError("zeroshot needs model=<export/checkpoint/run folder or released checkpoint> and "
                         "input.paths=<labelled images> and/or retrieval_input.paths=<captioned images>")
    check_tracking(cfg.tracking)
    if cfg.device == "cuda" and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        resolve_device("cuda")  # a local Ray's actors use this machine's GPU: refuse now if it has none
    student, _, _, info = load_trained_student(cfg.model, cfg.s3)  # its size, text tower, provenance
    size = student.cfg.img_size
    del student  # the actors encode
    started = init_ray(cfg.address, None)
    try:
        device = stream_device(cfg.device)
        classifier = load_classifier(cfg.classifier_path, cfg.s3) if cfg.classifier_path else {}
        needs_text = "weights" not in classifier or (cfg.retrieval_input is not None and "captions" not in classifier)
        encode_text, text_source = text_encoder(cfg, info, "cpu") if needs_text else (None, "the classifier file")
        sets = [EvalSet(cfg.input, "label")] if cfg.input is not None else []
        sets += [EvalSet(cfg.retrieval_input, "caption")] if cfg.retrieval_input is not None else []
        enc = Encoder(cfg.model, device, cfg.actors or _actors(device), cfg.threads or os.cpu_count() or 1,
                      cfg.batch_size)
        embedded = embed(sets, enc, s3=cfg.s3, size=size, max_images=cfg.max_images, label="evaluate")
        metrics: dict[str, float] = {}
        if cfg.input is not None:
            weights_DC = classifier.get("weights")
            if weights_DC is None:
                names, templates = prompts(cfg.classes, cfg.classnames, cfg.templates)
                weights_DC = build_classifier(encode_text, names, templates)
            emb_MD, labels = embedded.pop(0)
            metrics |= zeroshot_of_embeddings(emb_MD, torch.tensor(labels), weights_DC)
            metrics["images"] = len(labels)
        if cfg.retrieval_input is not None:
            emb_MD, captions = embedded.pop(0)
            metrics |= retrieval_of_embeddings(emb_MD, captions, eval_caption_bank(classifier, encode_text, captions))
            metrics["retrieval_images"], metrics["retrieval_texts"] = len(captions), len(set(captions))
    finally:
        if started:
            ray.shutdown()
    run_id = log_evaluation(cfg, metrics, text_source)
    shown = {k: v for k, v in info.items() if k not in ("text_state", "logit_scale")}
    return {"model": cfg.model, **shown, "text_tower": text_source, **metrics, "mlflow_run_id": run_id,
            "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}


def stream_device(device: str) -> str:
    """Where the encoder actors run: ``auto`` is CUDA when the connected cluster has a GPU."""
    if device == "auto":
        return "cuda" if cluster_resources()[1] >= 1 else "cpu"
    return device


def _actors(device: str) -> int:
    return max(1, int(cluster_resources()[1])) if device == "cuda" else 1


def log_evaluation(cfg: EvaluateConfig, metrics: dict[str, float], text_source: str) -> str | None:
    with tracking.start_run(cfg.tracking, "uta-evaluate", tags={"job": "evaluate", "uta.text_tower": text_source},
                            source="pipelines/evaluate.py") as run:
        tracking.log_config(cfg)
        tracking.log_metrics(metrics)
        if cfg.retrieval_input is not None:
            tracking.log_table(retrieval_table(metrics), "retrieval.json")
        return run.info.run_id if run is not None else None


def text_encoder(cfg: EvaluateConfig, info: dict, device: str) -> tuple[Callable[[list[str]], torch.Tensor], str]:
    """The text tower for class and caption embeddings: the configured teacher's, else a released UTA
    checkpoint's own (as the official zero-shot script uses it)."""
    if cfg.teacher is not None:
        return _teacher(cfg, device).encode_text, f"teacher {cfg.teacher.arch}"
    if info.get("text_state"):
        return official_text_encoder(info["text_state"], device), "the checkpoint's own"
    raise ValueError("zeroshot needs classifier_path=<file from build-classifier> or teacher.arch (+ "
                     "teacher.pretrained) for the text tower; a released UTA checkpoint brings its own")


def retrieval_table(metrics: dict[str, float]) -> dict[str, list]:
    """Recall@k as a two-row table (image->text, text->image) for MLflow's table view."""
    table: dict[str, list] = {"direction": ["image -> text", "text -> image"]}
    for k in RECALL_KS:
        table[f"R@{k}"] = [metrics[f"retrieval_i2t_r{k}"], metrics[f"retrieval_t2i_r{k}"]]
    return table

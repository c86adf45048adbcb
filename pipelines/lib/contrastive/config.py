"""The contrastive job's config: model (a small CLIP from scratch, or UTA stage 2), loss, data, eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.lib.train.config import ClusterConfig, RunConfig, TrainConfig
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.data.views import ViewConfig
from uta_core.models.clip import MAX_LOGIT_SCALE, ClipModelConfig
from uta_core.models.teacher import TeacherConfig
from uta_core.optim import OptimConfig
from uta_core.tracking import TrackingConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "contrastive_digits_teacher.yaml"


@dataclass(kw_only=True)
class ContrastiveModelConfig:
    init: Literal["scratch", "uta_student"] = "scratch"  # scratch: a new small CLIP; uta_student: stage 2
    clip: ClipModelConfig = field(default_factory=ClipModelConfig)
    # uta_student: the export folder pipelines/pretrain.py wrote, or a released UTA checkpoint file
    student: str | None = None
    # uta_student: the teacher whose text tower is fine-tuned; null with a released checkpoint: its own
    teacher: TeacherConfig | None = None

    def __post_init__(self) -> None:
        if self.init == "uta_student" and not self.student:
            raise ValueError("init=uta_student needs model.student (a UTA export folder or a released UTA "
                             "checkpoint file) and, for an export, model.teacher")
        if self.init == "scratch" and (self.student or self.teacher is not None):
            raise ValueError("init=scratch trains model.clip from scratch: unset model.student and model.teacher")


@dataclass(kw_only=True)
class ContrastiveLossConfig:
    temperature: float = 0.07  # the start value (learnable) or the value for good (fixed)
    learnable_temperature: bool = True  # UTA stage 2: false at 0.01
    soft_targets: bool = True  # samples with equal captions are positives for each other

    def __post_init__(self) -> None:
        if not 1.0 / MAX_LOGIT_SCALE <= self.temperature <= 1.0:
            raise ValueError(f"temperature={self.temperature} must lie in [{1 / MAX_LOGIT_SCALE}, 1]")


@dataclass(kw_only=True)
class ContrastiveDataConfig:
    input: InputConfig  # image-caption shards (WebDataset key.txt, or a parquet caption column)
    views: ViewConfig = field(default_factory=lambda: ViewConfig(size=32, scale=(1.0, 1.0), hflip=False))
    # Images are decoded once per epoch to a centre square of this side, and the training
    # crops are cut from it: above views.size, crops keep more detail. None = views.size.
    decode_size: int | None = None
    # the dataset's image count (open_clip's --train-num-samples); null: read it from
    # img2dataset's <shard>_stats.json files. Training never reads every shard to count.
    num_samples: int | None = None
    shuffle_files: bool = True  # a new shard order every epoch (seeded: reruns repeat it)
    shuffle_buffer: int = 1024  # rows permuted together in each worker; 0 keeps the shard order

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1 (or null: img2dataset's stats files)")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 turns shuffling off)")
        if self.decode_size is not None and self.decode_size < self.views.size:
            raise ValueError(f"decode_size={self.decode_size} must be >= views.size={self.views.size} (or null)")


@dataclass(kw_only=True)
class ContrastiveEvalConfig:
    """Zero-shot top-1 of the trained model, with its own text tower, on labelled held-out shards."""

    input: InputConfig | None = None  # None: no evaluation
    every: int = 0  # optimiser steps between evaluations; 0 = at the end only
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 10000
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.input is not None and not (self.classnames and self.templates):
            raise ValueError("eval.input needs eval.classnames and eval.templates (strings with '{}')")
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("eval.max_images and eval.batch_size must be >= 1")
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (0 evaluates at the end only)")


@dataclass(kw_only=True)
class ContrastiveJobConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="contrastive-local"))
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))
    data: ContrastiveDataConfig
    model: ContrastiveModelConfig = field(default_factory=ContrastiveModelConfig)
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=5e-5, grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(micro_batch=128, max_steps=150, warmup_steps=30))
    eval: ContrastiveEvalConfig = field(default_factory=ContrastiveEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.train.global_batch is not None:
            raise ValueError(
                "train.global_batch must be null: the contrastive loss needs every pair in one batch, "
                "so it cannot accumulate; set train.micro_batch (images per worker per step)"
            )
        if self.model.init == "scratch" and self.data.views.size != self.model.clip.vision["image_size"]:
            raise ValueError(
                f"data.views.size={self.data.views.size} must equal model.clip.vision.image_size="
                f"{self.model.clip.vision['image_size']} (the views are the image tower's input)"
            )

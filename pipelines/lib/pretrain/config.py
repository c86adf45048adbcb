"""The pre-training job's config: one typed section per component, checked as a whole.

``pipelines/pretrain.py`` builds it with ``uta_core.config.load_config`` from
``configs/pretrain_local.yaml`` + dotted overrides; sweeps vary the same keys
(``optim.lr``, ``mask.mask_ratio``, ``train.max_steps``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.lib.train.config import ClusterConfig, PoolConfig, RunConfig, TrainConfig
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.data.views import ViewConfig
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import TeacherConfig
from uta_core.objectives.alignment import ObjectiveConfig
from uta_core.objectives.masking import MaskConfig
from uta_core.optim import OptimConfig
from uta_core.targets.cached import CacheViews
from uta_core.targets.streamed import StreamCodecConfig
from uta_core.tracking import TrackingConfig

TeacherMode = Literal["online", "cache", "stream"]  # each a target source (pipelines/lib/pretrain/targets.py)
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "pretrain_local.yaml"


@dataclass(kw_only=True)
class DataConfig:
    # Where the teacher's tokens come from: online = raw shards, the teacher in every worker
    # (fresh views every epoch, as the paper); cache = a teacher cache (pipelines/cache_teacher.py);
    # stream = raw shards, fresh views every epoch, the teacher on its own actors (the stream section)
    teacher_mode: TeacherMode = "online"
    input: InputConfig | None = None  # raw shards (online and stream modes)
    cache: str | None = None  # cache root written by pipelines/cache_teacher.py (cache mode)
    views: ViewConfig = field(default_factory=ViewConfig)  # online mode; size = student img_size
    num_views: int = 1  # online mode: views per image per epoch, drawn afresh every epoch
    # online mode: the dataset's image count (open_clip's --train-num-samples); null: read it
    # from img2dataset's <shard>_stats.json files. Training never reads every shard to count.
    num_samples: int | None = None
    # cache mode: "cycle" = epoch e trains on stored view e mod V of every image (one view per
    # image per epoch, as online); "all" = every stored view every epoch (V x the rows).
    cache_views: CacheViews = "cycle"
    shuffle_files: bool = True  # a new shard/file order every epoch (seeded: reruns repeat it)
    # rows permuted together in each worker; 0 = off. With a buffer, a resumed epoch may
    # miss or repeat up to that many rows; without, it replays exactly.
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views={self.num_views} must be >= 1")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1 (or null: img2dataset's stats files)")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 turns it off)")


@dataclass(kw_only=True)
class StreamConfig(StreamCodecConfig):
    """teacher_mode=stream: the teacher's actors (on a cluster: their own GPU node group) and the codec
    its tokens travel in to the trainers."""

    pool: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        if self.token_rank < 1 or self.basis_views < 1:
            raise ValueError(f"token_rank={self.token_rank} and basis_views={self.basis_views} must be >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    """Zero-shot classification and retrieval of the student against the teacher's text embeddings."""

    input: InputConfig | None = None  # labelled shards (.cls / class folders / label column); None = off
    retrieval_input: InputConfig | None = None  # captioned shards: image <-> text recall@1/5/10; None = off
    every: int = 0  # optimiser steps between evaluations; 0 = at the end only
    classifier_path: str | None = None  # torch file {classnames, templates, weights (D, C)}
    classes: str | None = None  # a built-in set of class names + templates ("imagenet"), else classnames + templates
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 1000
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (0 evaluates at the end only)")
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("max_images and batch_size must be >= 1")
        if self.classes is not None and (self.classnames or self.templates):
            raise ValueError("set either classes (a built-in set) or classnames + templates, not both")
        if (self.classnames is None) != (self.templates is None):
            raise ValueError("classnames and templates go together: set both, or use classes")

    @property
    def enabled(self) -> bool:
        return self.input is not None or self.retrieval_input is not None


@dataclass(kw_only=True)
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    # A trained student to start from: an export, a checkpoint, a run folder or a released UTA checkpoint
    # file (local or s3://) of student.*'s architecture. A resumed run continues from its own checkpoint.
    init_from: str | None = None
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(precision="bf16"))
    teacher_random_seed: int | None = None  # int: allow a random-init teacher on purpose (tests, timing)
    stream: StreamConfig = field(default_factory=StreamConfig)  # teacher_mode=stream only
    mask: MaskConfig = field(default_factory=MaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.optim.layer_decay is not None:
            raise ValueError("optim.layer_decay must be null in pre-training (EVA-02/UTA use none); "
                             "it is a fine-tuning setting of pipelines/contrastive.py")
        ev = self.eval
        if ev.input is not None and ev.classifier_path is None and ev.classes is None and ev.classnames is None:
            raise ValueError("eval needs eval.classifier_path, eval.classes or eval.classnames + eval.templates")
        if self.mask.mask_ratio == 0 and self.objective.name in ("mim", "uta_mim"):
            raise ValueError(f"objective.name={self.objective.name} predicts the masked tokens, and "
                             "mask.mask_ratio=0 masks none; use mask.mask_ratio > 0 (e.g. 0.4) or objective.name=uta")


TRAINING_METRICS = ("loss", "grad_norm", "lr", "images_per_s", "step_time_s", "tokens_per_s")
STREAM_METRICS = ("stage_wait_s", "teacher_ready_blocks", "teacher_actors", "teacher_views_per_s",
                  "teacher_busy", "trainer_views_per_s", "trainer_wait_frac", "teacher_needed_actors",
                  "teacher_views_per_s_per_actor")


def reported_metrics(cfg: PretrainConfig) -> list[str]:
    """The metrics a run of ``cfg`` reports at each evaluation (a sweep's ``metric`` must be one of them)."""
    names = list(TRAINING_METRICS)
    if cfg.data.teacher_mode == "stream":
        names += STREAM_METRICS
    if cfg.eval.input is not None:
        names += ["zeroshot_top1", "zeroshot_top5"]
    if cfg.eval.retrieval_input is not None:
        names += [f"retrieval_{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]
    return names

"""The pre-training job's config: one typed section per component, checked as a whole.

``pipelines/pretrain.py`` builds it with ``uta_core.config.load_config`` from
``configs/pretrain_local.yaml`` + dotted overrides; sweeps vary the same keys
(``optim.lr``, ``mask.mask_ratio``, ``train.max_steps``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.lib.train.config import ClusterConfig, RunConfig, TrainConfig

from uta_core.data.views import ViewConfig
from uta_core.objectives.masking import MaskConfig
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import TeacherConfig
from uta_core.tracking import TrackingConfig
from uta_core.models.teacher_weights import check_weights_chosen
from uta_core.objectives.alignment import ObjectiveConfig
from uta_core.optim import OptimConfig

TEACHER_MODES = ("online", "cache")
CACHE_VIEWS = ("cycle", "all")
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "pretrain_local.yaml"


@dataclass(kw_only=True)
class DataConfig:
    teacher_mode: str = "online"  # online: raw shards + teacher in every worker; cache: teacher features
    input: InputConfig | None = None  # raw shards (online mode)
    cache: str | None = None  # cache root written by pipelines/cache_teacher.py (cache mode)
    views: ViewConfig = field(default_factory=ViewConfig)  # online mode; size = student img_size
    num_views: int = 1  # online mode: views per image per epoch, drawn afresh every epoch
    # online mode: the dataset's image count (open_clip's --train-num-samples); null: read it
    # from img2dataset's <shard>_stats.json files. Training never reads every shard to count.
    num_samples: int | None = None
    # cache mode: "cycle" = epoch e trains on stored view e mod V of every image (one view per
    # image per epoch, as online); "all" = every stored view every epoch (V x the rows).
    cache_views: str = "cycle"
    shuffle_files: bool = True  # a new shard/file order every epoch (seeded: reruns repeat it)
    # rows in each worker's local shuffle buffer; 0 = off. With a buffer, a resumed epoch may
    # miss or repeat up to that many rows; without, it replays exactly.
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode={self.teacher_mode!r} must be one of {', '.join(TEACHER_MODES)}")
        if self.teacher_mode == "online" and self.input is None:
            raise ValueError("teacher_mode=online reads raw shards: set data.input.paths")
        if self.teacher_mode == "cache" and not self.cache:
            raise ValueError("teacher_mode=cache reads a teacher cache: set data.cache to its root folder/URI")
        if self.num_views < 1:
            raise ValueError(f"num_views={self.num_views} must be >= 1")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1 (or null: img2dataset's stats files)")
        if self.cache_views not in CACHE_VIEWS:
            raise ValueError(f"cache_views={self.cache_views!r} must be one of {', '.join(CACHE_VIEWS)}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 turns it off)")


@dataclass(kw_only=True)
class EvalConfig:
    """Zero-shot classification and retrieval of the student against the teacher's text embeddings."""

    input: InputConfig | None = None  # labelled shards (.cls / class folders / label column); None = off
    retrieval_input: InputConfig | None = None  # captioned shards: image <-> text recall@1/5/10; None = off
    every: int = 0  # optimiser steps between evaluations; 0 = at the end only
    classifier_path: str | None = None  # torch file {classnames, templates, weights (D, C)}
    prompts: str | None = None  # a built-in prompt set ("imagenet"), else classnames + templates
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 1000
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (0 evaluates at the end only)")
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("max_images and batch_size must be >= 1")
        if self.prompts is not None and (self.classnames or self.templates):
            raise ValueError("set either prompts (a built-in set) or classnames + templates, not both")
        if (self.classnames is None) != (self.templates is None):
            raise ValueError("classnames and templates go together: set both, or use prompts")

    @property
    def enabled(self) -> bool:
        return self.input is not None or self.retrieval_input is not None


@dataclass(kw_only=True)
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(precision="bf16"))
    teacher_random_seed: int | None = None  # int: allow a random-init teacher on purpose (tests, timing)
    mask: MaskConfig = field(default_factory=MaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)
    fail_at_step: int | None = None  # testing: rank 0 raises at this step unless resumed
    fail_with_sigkill: bool = False  # testing: rank 0's process SIGKILLs itself instead of raising

    def __post_init__(self) -> None:
        if self.optim.layer_decay is not None:
            raise ValueError("optim.layer_decay must be null in pre-training (EVA-02/UTA use none); "
                             "it is a fine-tuning setting of pipelines/contrastive.py")
        if self.data.teacher_mode == "online":
            self._check_online_teacher()
        ev = self.eval
        if ev.enabled and ev.classifier_path is None:
            if self.data.teacher_mode == "cache":
                raise ValueError(
                    "eval in teacher_mode=cache needs eval.classifier_path (workers never build a teacher): "
                    "write one with `python pipelines/evaluate.py build-classifier`"
                )
            if ev.input is not None and ev.prompts is None and ev.classnames is None:
                raise ValueError("eval needs eval.classifier_path, eval.prompts or eval.classnames + eval.templates")

    def _check_online_teacher(self) -> None:
        if self.data.views.size != self.student.img_size:
            raise ValueError(
                f"data.views.size={self.data.views.size} must equal student.img_size={self.student.img_size} "
                "(the views are the student's input)"
            )
        if self.teacher.image_size not in (None, self.student.img_size):
            raise ValueError(
                f"teacher.image_size={self.teacher.image_size} differs from student.img_size="
                f"{self.student.img_size}: the teacher runs on the student's views; leave teacher.image_size null"
            )
        check_weights_chosen(self.teacher.arch, self.teacher.pretrained, self.teacher_random_seed)

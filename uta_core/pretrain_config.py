"""The pre-training job's config: one typed section per component, checked as a whole.

``pipelines/pretrain.py`` builds it with ``uta_core.config.load_config`` from
``configs/pretrain_local.yaml`` + dotted overrides; sweeps vary the same keys
(``optim.lr``, ``mask.mask_ratio``, ``train.max_steps``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from uta_core.data import ViewConfig
from uta_core.masking import MaskConfig
from uta_core.shards import InputConfig
from uta_core.storage import S3Options
from uta_core.student import StudentConfig
from uta_core.teacher import TeacherConfig
from uta_core.tracking import TrackingConfig
from uta_core.train import ObjectiveConfig, OptimConfig, TrainConfig

TEACHER_MODES = ("online", "cache")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(kw_only=True)
class RunSettings:
    name: str = "uta-local"  # rerunning the same name in the same storage_path resumes it
    storage_path: str = "runs"  # local folder or s3://bucket/prefix: checkpoints, export, config
    seed: int = 0
    log_every: int = 10  # optimiser steps between MLflow metrics (the loss is all-reduced over ranks)
    checkpoint_every: int = 100  # steps between checkpoints = ray.train.report calls (+ evals, the end)
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker failures Ray Train recovers from (from the last checkpoint)
    export: bool = True  # write the final student in timm's layout to <storage>/<name>/export
    record_samples: bool = False  # each rank writes the sample ids it trained on (<storage>/<name>/samples)

    def __post_init__(self) -> None:
        if not _RUN_NAME.fullmatch(self.name):
            raise ValueError(f"name={self.name!r} must be a plain folder name (letters, digits, . _ -)")
        if not self.storage_path:
            raise ValueError("storage_path must be a local folder or s3://bucket/prefix")
        for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures} must be >= 0 (or -1 for unlimited)")


@dataclass(kw_only=True)
class ClusterConfig:
    address: str | None = None  # None: $RAY_ADDRESS / the job's cluster, else a new local Ray
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Logical CPUs a *new local* Ray gets on top of the workers', so Ray Data can schedule
    # its read/decode tasks (with every CPU held by workers it stalls at 0 rows).
    data_cpus: float = 2.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers} must be >= 1")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be positive")
        if not self.data_cpus >= 1:
            raise ValueError(f"data_cpus={self.data_cpus} must be >= 1: Ray Data needs a CPU to read")


@dataclass(kw_only=True)
class DataConfig:
    teacher_mode: str = "online"  # online: raw shards + teacher in every worker; cache: teacher features
    input: InputConfig | None = None  # raw shards (online mode)
    cache: str | None = None  # cache root written by pipelines/cache_teacher.py (cache mode)
    views: ViewConfig = field(default_factory=ViewConfig)  # online mode; size = student img_size
    num_views: int = 1  # online mode: seeded views per image, as the cache job samples them
    shuffle_files: bool = True  # a new shard/file order every epoch
    shuffle_buffer: int = 0  # rows in each worker's local shuffle buffer; 0 = off

    def __post_init__(self) -> None:
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode={self.teacher_mode!r} must be one of {', '.join(TEACHER_MODES)}")
        if self.teacher_mode == "online" and self.input is None:
            raise ValueError("teacher_mode=online reads raw shards: set data.input.paths")
        if self.teacher_mode == "cache" and not self.cache:
            raise ValueError("teacher_mode=cache reads a teacher cache: set data.cache to its root folder/URI")
        if self.num_views < 1:
            raise ValueError(f"num_views={self.num_views} must be >= 1")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 turns it off)")


@dataclass(kw_only=True)
class EvalConfig:
    """Zero-shot classification of the student against the teacher's text embeddings."""

    input: InputConfig | None = None  # labelled shards (.cls / class folders / label column); None = off
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
        return self.input is not None


@dataclass(kw_only=True)
class PretrainConfig:
    run: RunSettings = field(default_factory=RunSettings)
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

    def __post_init__(self) -> None:
        if self.data.teacher_mode == "online":
            self._check_online_teacher()
        ev = self.eval
        if ev.enabled and ev.classifier_path is None:
            if self.data.teacher_mode == "cache":
                raise ValueError(
                    "eval in teacher_mode=cache needs eval.classifier_path (workers never build a teacher): "
                    "write one with `python pipelines/evaluate.py build-classifier`"
                )
            if ev.prompts is None and ev.classnames is None:
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
        carries_weights = self.teacher.arch.startswith(("hf-hub:", "local-dir:"))
        if self.teacher.pretrained is None and not carries_weights and self.teacher_random_seed is None:
            raise ValueError(
                "teacher.pretrained is null, i.e. random weights: set teacher.pretrained=<tag, path or "
                "s3:// URI>, or teacher_random_seed=<int> to train against a random-init teacher on purpose"
            )

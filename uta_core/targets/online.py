"""The online teacher (the paper's recipe): fresh views of the raw shards every epoch, and the
frozen teacher in every training worker computing their tokens at each step.

Shape legend: B batch, T = 1+N tokens (CLS first), D teacher embed dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from uta_core.data.epochs import Sources, producer_counts, spread
from uta_core.data.rows import OnlineRows
from uta_core.data.shards import InputConfig, discover
from uta_core.data.storage import S3Options
from uta_core.data.views import ViewConfig, to_model_input
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher
from uta_core.models.teacher_weights import check_student_fits_teacher, check_weights_chosen
from uta_core.targets.source import SetUpNothing, TargetPlan, check_teacher_fits


@dataclass(frozen=True, kw_only=True)
class OnlineTargets(SetUpNothing):
    mode: ClassVar[str] = "online"
    teacher_in_worker: ClassVar[bool] = True
    teacher_apart: ClassVar[bool] = False  # the teacher runs in the workers

    input: InputConfig  # the raw shards
    views: ViewConfig
    num_views: int  # fresh views per image per epoch
    num_samples: int | None  # the dataset's image count; None: img2dataset's stats files
    teacher: TeacherConfig
    teacher_random_seed: int | None
    s3: S3Options

    def check(self, student: StudentConfig) -> None:
        if self.views.size != student.img_size:
            raise ValueError(f"data.views.size={self.views.size} must equal student.img_size={student.img_size} "
                             "(the views are the student's input)")
        if self.teacher.image_size not in (None, student.img_size):
            raise ValueError(f"teacher.image_size={self.teacher.image_size} differs from student.img_size="
                             f"{student.img_size}: the teacher runs on the student's views; "
                             "leave teacher.image_size null")
        check_weights_chosen(self.teacher.arch, self.teacher.pretrained, self.teacher_random_seed)
        check_student_fits_teacher(self.teacher.arch, student)

    def plan(self) -> TargetPlan:
        """Raw shards and their sample counts, from metadata only (never a pass over the data)."""
        inputs = discover(self.input, self.s3, "data.input.paths")
        if self.num_samples is not None:  # stated by the user: no stats file is read
            counts, origin = spread(self.num_samples, len(inputs.shards)), "data.num_samples"
        else:
            counts, origin = producer_counts(inputs.fs, inputs.shards), "img2dataset *_stats.json"
        if counts is None:
            raise ValueError(
                f"the number of images in {self.input.paths} is unknown and training never reads every shard to "
                "count them: set data.num_samples (the dataset's image count, as open_clip's --train-num-samples), "
                "or keep img2dataset's <shard>_stats.json files next to the shards")
        sources = Sources(items=list(inputs.shards), rows=[n * self.num_views for n in counts], counted_from=origin)
        teacher: dict[str, Any] = {"arch": self.teacher.arch, "pretrained": self.teacher.pretrained,
                                   "random_seed": self.teacher_random_seed, "precision": self.teacher.precision}
        return TargetPlan(sources=sources, teacher=teacher)

    def reader(self, epoch: int) -> OnlineRows:
        return OnlineRows(input=self.input, views=self.views, num_views=self.num_views, s3=self.s3, epoch=epoch)

    def open(self, student: StudentConfig, device: torch.device) -> TeacherInWorker:
        cfg = dataclasses.replace(self.teacher, image_size=student.img_size)
        teacher = build_teacher(cfg, random_seed=self.teacher_random_seed, device=device, s3=self.s3)
        check_teacher_fits(teacher, student)
        return TeacherInWorker(teacher)


class TeacherInWorker:
    """The frozen teacher on the worker's device: the tokens of each batch's views, at every step."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher, self.mean, self.std = teacher, teacher.mean, teacher.std

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images_B3HW = to_model_input(batch["image"].to(device, non_blocking=True), self.mean, self.std)
        return images_B3HW, self.teacher.encode_tokens(images_B3HW)

    def text_teacher(self) -> Teacher:
        return self.teacher

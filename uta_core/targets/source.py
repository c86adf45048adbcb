"""The seam between pre-training and its teacher: a ``TargetSource`` per teacher mode.

A source lives in up to four places. On the driver it checks the student against the teacher's
geometry and plans what the run reads (``TargetPlan``: the sources with their row counts,
and the teacher's provenance), from metadata only, then ``start``s the run (the streamed
teacher fits its codec once; the others have nothing to do). In a read task it is the
``reader`` of one source of a rank's epoch (rows as ``uta_core.data.rows`` lists them). A
source may have a ``stage``: work on each block between the reads and the steps that runs
apart from the trainers (the streamed teacher's tokens, on its own actors). In a training
worker it opens ``Targets``: a batch of rows -> (normalised images, the teacher's tokens).
The training task and the loop never ask which mode they run.

Shape legend: B batch, T = 1+N tokens (CLS first), D teacher embed dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

import torch

from uta_core.data.epochs import Sources
from uta_core.data.stream import SourceReader
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import Teacher
from uta_core.run.folder import RunFolder


@dataclass(frozen=True, kw_only=True)
class TargetPlan:
    """What a run reads and whose tokens it learns, computed once on the driver."""

    sources: Sources
    teacher: dict[str, Any]  # provenance: arch, pretrained, fingerprint, ... (MLflow params, the export)


class Targets(Protocol):
    """A training worker's side of a source: rows -> (images (B, 3, H, W), teacher tokens (B, T, D) float32)."""

    mean: tuple[float, ...]  # the student's input normalisation (its teacher's)
    std: tuple[float, ...]
    teacher: Teacher | None  # a teacher in this process, if there is one (zero-shot classifiers without a file)

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def text_teacher(self) -> Teacher | None:
        """The teacher whose text tower goes with the export; None when it cannot be had here."""


class TargetSource(Protocol):
    mode: ClassVar[str]  # data.teacher_mode
    teacher_in_worker: ClassVar[bool]  # workers hold a teacher (can build classifiers without a file)
    teacher_apart: ClassVar[bool]  # a teacher runs on actors of its own: its ``stage`` (pool resources)

    def check(self, student: StudentConfig) -> None:
        """Refuse a student that does not fit the teacher's tokens (metadata only; a ValueError naming the key)."""

    def plan(self) -> TargetPlan:
        """The run's sources and the teacher's provenance (metadata only)."""

    def start(self, student: StudentConfig, run: RunFolder, items: list[Any], call: Callable[..., Any],
              device: str) -> TargetSource:
        """The source a run trains with, set up once before the workers start (what it keeps goes into the
        held run folder ``run``); ``call(fn, *args)`` runs ``fn`` where a teacher may run (``device``),
        ``items`` are the run's sources in plan order."""

    def provenance(self) -> dict[str, Any]:
        """What the started source adds to the teacher's provenance (e.g. its codec)."""

    def reader(self, epoch: int) -> SourceReader:
        """Reads one source of a rank's ``epoch`` (picklable: it runs in read tasks)."""

    def stage(self, student: StudentConfig, device: str, threads: int | None) -> Any | None:
        """Work on each block that runs apart from the trainers (``open()`` -> block -> extra columns); None:
        none (the rows already hold what ``open`` needs)."""

    def open(self, student: StudentConfig, device: torch.device) -> Targets:
        """The worker's targets (builds the teacher or loads the codec)."""


class SetUpNothing:
    """A source with nothing to set up at the run's start and no stage (online: the teacher is in the
    worker; cache: the tokens are in the rows)."""

    def start(self, student: StudentConfig, run: RunFolder, items: list[Any], call: Callable[..., Any],
              device: str) -> Self:
        return self

    def provenance(self) -> dict[str, Any]:
        return {}

    def stage(self, student: StudentConfig, device: str, threads: int | None) -> None:
        return None


def check_teacher_fits(teacher: Teacher, student: StudentConfig) -> None:
    """A built teacher's grid and joint dim against the student's (in the worker, for every teacher source)."""
    teacher.check_grid(student.grid, student.patch_size)
    if teacher.embed_dim != student.out_dim:
        raise ValueError(f"student.out_dim={student.out_dim} but the teacher's joint embed dim is {teacher.embed_dim}; "
                         f"set student.out_dim={teacher.embed_dim}")

"""The streamed teacher: fresh views every epoch (as online mode), their tokens computed by a
teacher that runs apart from the trainers (actors on their own GPUs on a cluster) and handed to
the training worker in a token codec's bytes; nothing is stored.

The pieces, all without Ray:
- ``StreamedTargets`` is the target source: online mode's sources, reader and checks, and on
  the worker the codec that restores the tokens (``StoredTokens``, as the cache's).
- ``TeacherStage`` is what runs between a rank's reads and its steps: built once per teacher
  process, it maps a block of decoded views to its ``tokens`` column. Tokens depend on the
  pixels only, so any actor may encode any block, and a block encoded twice (a restarted
  actor) gives the same bytes.
- ``stream_setup`` builds the teacher once at the run's start: its input mean/std, token
  shape and weights fingerprint, and for ``lowrank_int8`` the basis fitted on the first views
  of the run with its cosine (stored in the run folder and reused on resume).

Shape legend: B views, T = 1+N tokens (CLS first), D teacher embed dim, S codec bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from uta_core.cache.codecs import LowRankBasis, TokenCodec, basis_sha256
from uta_core.cache.writer import fit_views_basis, teacher_tokens
from uta_core.data.stream import SourceReader
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import Teacher, build_teacher
from uta_core.run.folder import RunFolder
from uta_core.targets.cached import StoredTokens
from uta_core.targets.online import OnlineTargets
from uta_core.targets.source import TargetPlan, check_teacher_fits

StreamCodec = Literal["float16", "int8", "lowrank_int8"]


@dataclass(kw_only=True)
class StreamCodecConfig:
    codec: StreamCodec = "lowrank_int8"  # bytes per view through the object store (uta_core/cache/codecs.py)
    token_rank: int = 64  # lowrank_int8: basis rank r
    basis_views: int = 512  # lowrank_int8: views of the run's first sources the basis is fitted on


@dataclass(frozen=True)
class StreamSetup:
    """What the run's start learns from one built teacher (metadata; the basis is a few hundred KB)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    token_shape: tuple[int, int]  # (T, D)
    fingerprint: str  # the teacher's weights (every actor must build the same)
    basis: bytes | None = None  # lowrank_int8: safetensors bytes of the basis
    basis_cosine: dict[str, float] | None = None  # restored vs original tokens on the fitting views

    def codec(self, name: str) -> TokenCodec:
        basis = LowRankBasis.from_bytes(self.basis) if self.basis is not None else None
        return TokenCodec(name=name, token_shape=self.token_shape, basis=basis if name == "lowrank_int8" else None)


@dataclass(frozen=True, kw_only=True)
class TeacherStage:
    """A teacher process's work: a block of views -> their tokens in the codec (picklable; built once
    per process by ``open``)."""

    online: OnlineTargets  # the teacher's config and weights
    image_size: int
    codec: str
    setup: StreamSetup
    device: str = "cpu"
    threads: int | None = None

    def open(self) -> TokenStage:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        teacher = build_stream_teacher(self.online, self.image_size, self.device)
        if teacher.weights_fingerprint() != self.setup.fingerprint:
            raise RuntimeError(
                f"this teacher process built weights {teacher.weights_fingerprint()} but the run started with "
                f"{self.setup.fingerprint}: teacher.pretrained ({self.online.teacher.pretrained}) differs between "
                "machines; make it identical everywhere (e.g. an s3:// path)")
        return TokenStage(teacher, self.setup.codec(self.codec), torch.device(self.device))


class TokenStage:
    """The built teacher and codec: ``stage(block)`` -> ``{"tokens": (B, S) uint8}``."""

    def __init__(self, teacher: Teacher, codec: TokenCodec, device: torch.device) -> None:
        self.teacher, self.codec, self.device = teacher, codec, device

    def tokens(self, pixels_BHW3: np.ndarray) -> torch.Tensor:
        return teacher_tokens(self.teacher, pixels_BHW3, self.device)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(block["image"]) == 0:
            return {"tokens": np.zeros((0, self.codec.bytes_per_view), np.uint8)}
        return {"tokens": self.codec.encode(self.tokens(block["image"]))}


def build_stream_teacher(online: OnlineTargets, image_size: int, device: str) -> Teacher:
    cfg = dataclasses.replace(online.teacher, image_size=image_size)
    return build_teacher(cfg, random_seed=online.teacher_random_seed, device=device, s3=online.s3)


def stream_setup(online: OnlineTargets, student: StudentConfig, codec: StreamCodecConfig,
                 first_views: Iterator[np.ndarray], device: str = "cpu") -> StreamSetup:
    """Build the teacher once: check it fits the student, read its normalisation and token shape, and
    for ``lowrank_int8`` fit the basis on ``codec.basis_views`` of ``first_views``."""
    teacher = build_stream_teacher(online, student.img_size, device)
    check_teacher_fits(teacher, student)
    T = 1 + student.grid[0] * student.grid[1]
    setup = StreamSetup(mean=tuple(teacher.mean), std=tuple(teacher.std), token_shape=(T, teacher.embed_dim),
                        fingerprint=teacher.weights_fingerprint())
    if codec.codec != "lowrank_int8":
        return setup
    if codec.token_rank > teacher.embed_dim:
        raise ValueError(f"stream.token_rank={codec.token_rank} exceeds the teacher's embed dim {teacher.embed_dim}; "
                         f"set stream.token_rank <= {teacher.embed_dim}")
    views = list(itertools.islice(first_views, codec.basis_views))
    if not views:
        raise ValueError(f"no decodable image in {online.input.paths}: cannot fit the token basis")
    basis, cosine = fit_views_basis(teacher, views, codec.token_rank, device)
    return dataclasses.replace(setup, basis=basis, basis_cosine=cosine)


def first_views(online: OnlineTargets, items: list[Any]) -> Iterator[np.ndarray]:
    """The views of epoch 0 in source order (what the basis is fitted on)."""
    reader = online.reader(0)
    for source, item in enumerate(items):
        for block in reader(item, 0, source):
            yield from block["image"]


def setup_views(online: OnlineTargets, student: StudentConfig, codec: StreamCodecConfig, items: list[Any],
                device: str) -> StreamSetup:
    """``stream_setup`` on the first views of ``items`` (runs where a teacher may run: it reads data)."""
    return stream_setup(online, student, codec, first_views(online, items), device)


def save_setup(run: RunFolder, setup: StreamSetup) -> None:
    meta = {"mean": list(setup.mean), "std": list(setup.std), "token_shape": list(setup.token_shape),
            "fingerprint": setup.fingerprint, "basis_cosine": setup.basis_cosine,
            "basis_sha256": basis_sha256(setup.basis) if setup.basis is not None else None}
    run.save_stream_setup(meta, setup.basis)


def load_setup(run: RunFolder) -> StreamSetup | None:
    """The setup an earlier start of this run stored; None when there is none."""
    stored = run.stream_setup()
    if stored is None:
        return None
    meta, basis = stored
    if meta["basis_sha256"] and (basis is None or basis_sha256(basis) != meta["basis_sha256"]):
        raise ValueError(f"{run.uri}: the stream's token basis is missing or differs from the one its setup recorded: "
                         "the run's checkpoints were trained on tokens restored with that basis; restore the file "
                         "or start a new run (another run.name)")
    return StreamSetup(mean=tuple(meta["mean"]), std=tuple(meta["std"]), token_shape=tuple(meta["token_shape"]),
                       fingerprint=meta["fingerprint"], basis=basis if meta["basis_sha256"] else None,
                       basis_cosine=meta["basis_cosine"])


@dataclass(frozen=True, kw_only=True)
class StreamedTargets:
    mode: ClassVar[str] = "stream"
    teacher_in_worker: ClassVar[bool] = False
    teacher_apart: ClassVar[bool] = True  # the teacher runs on actors of its own (a stage)

    online: OnlineTargets  # the sources, views and teacher of online mode
    codec: StreamCodecConfig
    setup: StreamSetup | None = None  # set at the run's start (``stream_setup``), before the workers

    def check(self, student: StudentConfig) -> None:
        self.online.check(student)

    def plan(self) -> TargetPlan:
        return self.online.plan()  # online mode's sources and counts, from metadata

    def reader(self, epoch: int) -> SourceReader:
        return self.online.reader(epoch)

    def start(self, student: StudentConfig, run: RunFolder, items: list[Any], call: Callable[..., Any],
              device: str = "cpu") -> StreamedTargets:
        """The run's setup: the one an earlier start stored in the run folder, else fitted now by
        ``call(setup_views, ...)`` (where a teacher may run) and stored."""
        setup = load_setup(run)
        if setup is None:
            setup = call(setup_views, self.online, student, self.codec, items, device)
            save_setup(run, setup)
        return dataclasses.replace(self, setup=setup)

    def provenance(self) -> dict[str, Any]:
        setup = self._setup()
        out = {"codec": self.codec.codec, "fingerprint": setup.fingerprint, "mean": list(setup.mean),
               "std": list(setup.std)}
        if setup.basis is not None:
            out.update(token_rank=self.codec.token_rank, basis_sha256=basis_sha256(setup.basis),
                       basis=setup.basis_cosine)
        return out

    def stage(self, student: StudentConfig, device: str = "cpu", threads: int | None = None) -> TeacherStage:
        return TeacherStage(online=self.online, image_size=student.img_size, codec=self.codec.codec,
                            setup=self._setup(), device=device, threads=threads)

    def open(self, student: StudentConfig, device: torch.device) -> StoredTokens:
        setup = self._setup()
        provenance = {"arch": self.online.teacher.arch, "pretrained": self.online.teacher.pretrained,
                      "image_size": student.img_size, "fingerprint": setup.fingerprint}
        return StoredTokens(setup.codec(self.codec.codec), setup.mean, setup.std, provenance,
                            self.online.teacher_random_seed, self.online.s3)

    def _setup(self) -> StreamSetup:
        if self.setup is None:
            raise RuntimeError("the streamed teacher's setup runs at the run's start (stream_setup), before any worker")
        return self.setup

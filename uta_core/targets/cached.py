"""The cached teacher: tokens a teacher cache stores (``pipelines/cache_teacher.py``), restored on
the training worker's device by the cache's codec; no teacher runs in training.

A cache holds V views per image: ``cycle`` trains epoch e on stored view e mod V (one view
per image per epoch), ``all`` on every stored view every epoch.

Shape legend: B batch, T = 1+N tokens (CLS first), D teacher embed dim, S stored bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from uta_core.cache.codecs import TokenCodec
from uta_core.cache.format import Manifest, load_codec, open_cache
from uta_core.cache.reader import CachePart, CacheRows, ViewSource
from uta_core.cache.verify import check_part_sizes
from uta_core.data.epochs import Sources
from uta_core.data.storage import S3Options, filesystem_for, join
from uta_core.data.views import to_model_input
from uta_core.models.student import StudentConfig
from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher
from uta_core.targets.source import SetUpNothing, TargetPlan

log = logging.getLogger("uta.targets")
CacheViews = Literal["cycle", "all"]


@dataclass(frozen=True, kw_only=True)
class CachedTargets(SetUpNothing):
    mode: ClassVar[str] = "cache"
    teacher_in_worker: ClassVar[bool] = False
    teacher_apart: ClassVar[bool] = False  # no teacher runs at all

    uri: str  # the cache root
    manifest: Manifest  # read once, on the driver
    cache_views: CacheViews
    teacher_random_seed: int | None  # a random-init cache teacher, rebuilt for the export's text tower
    s3: S3Options

    @classmethod
    def load(cls, uri: str, cache_views: CacheViews, teacher_random_seed: int | None,
             s3: S3Options) -> CachedTargets:
        return cls(uri=uri, manifest=open_cache(uri, s3)[2], cache_views=cache_views,
                   teacher_random_seed=teacher_random_seed, s3=s3)

    @property
    def stored_views(self) -> int:
        return int(self.manifest.settings.views["num_views"])

    def check(self, student: StudentConfig) -> None:
        """Refuse a cache whose tokens or views do not fit the student."""
        s, uri = self.manifest.settings, self.uri
        if tuple(s.grid) != student.grid:
            size, patch = s.views["size"], s.views["size"] // s.grid[0]  # what makes the student's grid the cache's
            wanted = (("img_size", size, student.img_size), ("patch_size", patch, student.patch_size))
            fix = " ".join(f"student.{k}={v}" for k, v, now in wanted if v != now)
            raise ValueError(
                f"{uri} holds teacher tokens on a {s.grid[0]}x{s.grid[1]} grid of {size} px views but the student's "
                f"grid is {student.grid[0]}x{student.grid[1]} (img_size {student.img_size}, patch "
                f"{student.patch_size}); set {fix}, or rebuild the cache for this student")
        if s.token_shape[1] != student.out_dim:
            raise ValueError(f"{uri} holds {s.token_shape[1]}-dim teacher tokens but student.out_dim="
                             f"{student.out_dim}; set student.out_dim={s.token_shape[1]}")
        if s.views["size"] != student.img_size:
            raise ValueError(f"{uri} holds {s.views['size']} px views but student.img_size={student.img_size}; "
                             f"set student.img_size={s.views['size']}")
        if not self.manifest.shards:
            raise ValueError(f"{uri} has no committed shards yet; finish pipelines/cache_teacher.py first")

    def plan(self) -> TargetPlan:
        """The cache's part files and row counts from its manifest."""
        fs, root = filesystem_for(self.uri, self.s3)
        m = self.manifest
        check_part_sizes(fs, root, self.uri, m.shards, self.s3)  # one listing, before any worker starts
        rows = [n if self.cache_views == "all" else n // self.stored_views for _, n in m.files()]
        parts = []
        for name in sorted(m.shards):
            rebuild = None
            if m.settings.pixel_format == "none":  # no pixels: each view is rebuilt from its input shard
                rebuild = ViewSource.of(m.shards[name].input_shard, m.settings.source_columns, m.settings.views["size"])
            parts += [CachePart(path=join(root, p.file), rebuild=rebuild, shard=name, file=p.file, bytes=p.bytes,
                                sha256=p.sha256, xxh3_128=p.xxh3_128) for p in m.shards[name].parts]
        sources = Sources(items=parts, rows=rows, counted_from="the cache manifest")
        return TargetPlan(sources=sources, teacher=dict(m.settings.teacher))

    def reader(self, epoch: int) -> CacheRows:
        view = epoch % self.stored_views if self.cache_views == "cycle" else None
        return CacheRows(uri=self.uri, s3=self.s3, view=view)

    def open(self, student: StudentConfig, device: torch.device) -> StoredTokens:
        fs, root = filesystem_for(self.uri, self.s3)
        teacher = self.manifest.settings.teacher
        return StoredTokens(load_codec(fs, root, self.manifest), tuple(teacher["mean"]), tuple(teacher["std"]),
                            teacher, self.teacher_random_seed, self.s3)


class StoredTokens:
    """The rows' stored token bytes, restored on the device by the cache's codec."""

    teacher = None  # no teacher runs in training

    def __init__(self, codec: TokenCodec, mean: tuple[float, ...], std: tuple[float, ...],
                 provenance: dict[str, Any], teacher_random_seed: int | None, s3: S3Options) -> None:
        self.codec, self.mean, self.std = codec, mean, std
        self._provenance, self._seed, self._s3 = provenance, teacher_random_seed, s3

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if "tokens" not in batch:
            raise ValueError("cached targets got rows without a tokens column; is data.cache a teacher cache?")
        images_B3HW = to_model_input(batch["image"].to(device, non_blocking=True), self.mean, self.std)
        return images_B3HW, self.codec.decode(batch["tokens"].to(device, non_blocking=True))

    def text_teacher(self) -> Teacher | None:
        """The cache's teacher, rebuilt for its text tower; None when its weights cannot be had here
        or differ from the cache's."""
        spec = self._provenance
        try:
            teacher = build_teacher(TeacherConfig(arch=spec["arch"], pretrained=spec.get("pretrained"),
                                                  image_size=spec.get("image_size")),
                                    random_seed=self._seed, s3=self._s3)
        except (ValueError, OSError, RuntimeError) as err:
            log.warning("the export has no open_clip CLIP: the cache's teacher could not be built (%s); "
                        "add it with `python pipelines/export.py`", err)
            return None
        if spec.get("fingerprint") not in (None, teacher.weights_fingerprint()):
            log.warning("the export has no open_clip CLIP: the teacher built from %s is not the cache's "
                        "(weights fingerprint differs); add it with `python pipelines/export.py`", spec["arch"])
            return None
        return teacher

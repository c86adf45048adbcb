"""Planning a teacher-feature cache (driver side, Ray-free): settings, resume, refusal to mix.

``plan_cache`` resolves inputs and output, builds the teacher once for its geometry and
weights fingerprint, compares with an existing manifest (refusing other settings) and
splits the input shards into done and pending. It writes nothing, so a missing path, a
missing bucket or refused credentials fail before any side effect; ``prepare_output`` is the
first write. A rerun never deletes committed work: a committed shard that today's inputs do not
name is kept (and reported), and only part files that no manifest record lists are deleted, from
a listing that never follows a symbolic link. The job's data flow: docs/ARCHITECTURE.md; the
format: docs/CACHE_FORMAT.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.fs as pafs
import torch

from uta_core.cache.format import (
    MANIFEST_NAME,
    CacheSettings,
    Manifest,
    load_manifest,
    settings_diff,
)
from uta_core.cache.output import CacheOutput
from uta_core.cache.verify import mismatched_parts, part_sizes
from uta_core.data.shards import InputConfig, InputSet, InputShard, discover, shard_names
from uta_core.data.storage import (
    S3Options,
    StorageError,
    check_bucket,
    check_local_output,
    filesystem_for,
    is_atomic_leftover,
    join,
    list_dir,
    translate_error,
)
from uta_core.data.views import ViewConfig
from uta_core.lease import LEASE_DIR, Lease, LeaseConfig
from uta_core.models.teacher import ImageSizeError, Teacher, TeacherConfig, build_teacher
from uta_core.models.teacher_weights import check_weights_chosen

log = logging.getLogger("uta.cache")
# (cache uri, [(part path, sha256)], s3) -> the paths whose bytes do not match
Verifier = Callable[[str, list[tuple[str, str]], S3Options], list[str]]


@dataclass(kw_only=True)
class OutputConfig:
    path: str = ""  # local folder or s3://bucket/prefix
    token_codec: Literal["float16", "int8", "lowrank_int8"] = "float16"  # uta_core/cache/codecs.py
    token_rank: int = 64  # lowrank_int8: basis rank r (bytes per view: 2 D + N (2 + r))
    basis_views: int = 256  # lowrank_int8: views of the first input shards the basis is fitted on
    # jpeg: the teacher sees the decoded JPEG; png: lossless; none: no pixels, training rebuilds
    # each view from the input shard (which must stay where it is, unchanged)
    pixel_format: Literal["jpeg", "png", "none"] = "jpeg"
    jpeg_quality: int = 95
    compression: Literal["none", "zstd", "snappy"] = "zstd"  # every column but the tokens
    token_compression: Literal["none", "zstd", "snappy"] = "none"  # fp16 tokens: zstd saves ~8%, reads 4x slower
    part_mb: float = 256  # a write task gathers about this much into its part files (a shard commits
    # once all its parts are written: small jobs with big parts commit everything at the end)
    manifest_interval_s: float = 5.0  # the manifest is rewritten at most this often (and at the end)
    row_group_mb: int = 64  # target size of a part file's row groups
    # A rerun checks the committed parts' sizes always; verify: also their sha256 (reads every committed
    # byte once, one Ray task per few parts) and redoes the shards whose parts do not match.
    verify: bool = False
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one job at a time owns the cache

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path is empty: pass output.path=<folder or s3://bucket/prefix>")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.row_group_mb < 1:
            raise ValueError(f"row_group_mb must be at least 1, got {self.row_group_mb}")
        if self.token_rank < 1 or self.basis_views < 1:
            raise ValueError("token_rank and basis_views must be at least 1")
        if self.part_mb <= 0 or self.manifest_interval_s < 0:
            raise ValueError("part_mb must be positive and manifest_interval_s not negative")


@dataclass(kw_only=True)
class CacheSpec:
    """What the cache holds and where it goes; the job adds Ray and MLflow settings."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_random_seed: int | None = None  # int: allow random-init weights (tests, smoke runs)
    views: ViewConfig = field(default_factory=ViewConfig)
    num_views: int = 2
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {self.num_views}")
        if self.teacher.image_size not in (None, self.views.size):
            raise ValueError(
                f"teacher.image_size={self.teacher.image_size} differs from views.size={self.views.size}: "
                "the teacher runs at the view resolution; leave teacher.image_size null"
            )
        check_weights_chosen(self.teacher.arch, self.teacher.pretrained, self.teacher_random_seed)

    @property
    def teacher_config(self) -> TeacherConfig:
        return dataclasses.replace(self.teacher, image_size=self.views.size)


def build_cache_teacher(cfg: CacheSpec, device: str | torch.device = "cpu") -> Teacher:
    """The frozen teacher at the view resolution (every actor builds the same, seeded, weights)."""
    try:
        return build_teacher(cfg.teacher_config, random_seed=cfg.teacher_random_seed, device=device, s3=cfg.s3)
    except ImageSizeError as err:  # the teacher runs at the view size: that is the key to change
        raise ValueError(err.advice("views.size")) from None


def cache_settings(cfg: CacheSpec, teacher: Teacher) -> CacheSettings:
    if cfg.output.token_codec == "lowrank_int8" and cfg.output.token_rank > teacher.embed_dim:
        raise ValueError(f"output.token_rank={cfg.output.token_rank} exceeds the teacher's embed dim "
                         f"{teacher.embed_dim}; pick a rank below it (64 keeps ~1/12 of fp16's bytes at D = 768)")
    if cfg.views.size % teacher.patch_size:
        raise ValueError(
            f"views.size={cfg.views.size} is not a multiple of the teacher's patch size "
            f"{teacher.patch_size}; pick a size that gives a whole token grid"
        )
    views = {**dataclasses.asdict(cfg.views), "num_views": cfg.num_views}
    if cfg.output.pixel_format == "jpeg":
        views["jpeg_quality"] = cfg.output.jpeg_quality
    return CacheSettings(
        teacher={
            "arch": teacher.arch, "pretrained": teacher.pretrained,
            "fingerprint": teacher.weights_fingerprint(), "embed_dim": teacher.embed_dim,
            "patch_size": teacher.patch_size, "image_size": teacher.image_size,
            "mean": list(teacher.mean), "std": list(teacher.std), "precision": teacher.precision,
        },
        grid=list(teacher.grid),
        token_shape=[1 + teacher.grid[0] * teacher.grid[1], teacher.embed_dim],
        token_codec=cfg.output.token_codec,
        token_rank=cfg.output.token_rank if cfg.output.token_codec == "lowrank_int8" else None,
        pixel_format=cfg.output.pixel_format,
        views=views,
        source_columns=({"image_column": cfg.input.image_column, "key_column": cfg.input.key_column}
                        if cfg.output.pixel_format == "none" else None),
    )


# --------------------------------------------------------------------- planning
class CacheMismatchError(ValueError):
    """The output already holds a cache made with other settings."""


@dataclass(kw_only=True)
class CachePlan:
    cfg: CacheSpec
    inputs: InputSet
    out: CacheOutput  # the output, and every write the driver makes to it
    manifest: Manifest
    manifest_exists: bool
    pending: dict[str, InputShard]  # name -> shard still to do
    done: list[str]  # names already committed
    redo: list[str]  # names whose committed file vanished or changed, or whose input broke part-way
    kept: list[str] = field(default_factory=list)  # committed shards today's inputs do not name: kept as they are
    stray: list[str] = field(default_factory=list)  # part files no manifest record lists: a killed run's, deleted

    @property
    def fs(self) -> pafs.FileSystem:
        return self.out.fs

    @property
    def root(self) -> str:
        return self.out.root

    @property
    def root_uri(self) -> str:
        return self.out.uri


def plan_cache(cfg: CacheSpec, teacher: Teacher | None = None, verify_with: Verifier | None = None,
               lease: Lease | None = None) -> CachePlan:
    """Everything that can fail before work starts fails here; nothing is written. ``output.verify``:
    the committed parts' hashes are checked by ``verify_with`` (default: here, serially). ``lease``: the
    output's, which every later write to it asks first (``CacheOutput``)."""
    inputs = discover(cfg.input, cfg.s3)
    fs, root = filesystem_for(cfg.output.path, cfg.s3)
    check_bucket(fs, root, cfg.s3)
    check_local_output(fs, root, "output.path")
    out = CacheOutput(fs=fs, root=root, s3=cfg.s3, lease=lease)
    try:
        existing = load_manifest(fs, root)
        if existing is None:
            _check_empty_output(fs, root, cfg)
        out.note_manifest()
    except OSError as err:
        raise translate_error(err, cfg.output.path, cfg.s3) from None
    teacher = teacher or build_cache_teacher(cfg)
    settings = cache_settings(cfg, teacher)
    if existing is not None:
        _check_compatible(existing, settings, inputs.class_names, cfg.output.path)
    manifest = existing or Manifest(settings=settings, class_names=inputs.class_names)
    committed_sources = {name: rec.source for name, rec in manifest.shards.items()}
    names = shard_names([s.uri for s in inputs.shards], committed_sources)
    # One listing of the part files (metadata): what is there, and what no manifest record names.
    sizes, links = part_sizes(fs, root, cfg.s3)
    for link in links:
        log.warning("%s: %s is a symbolic link; the cache neither follows nor deletes it", cfg.output.path, link)
    pending, done, redo = {}, [], []
    for name, shard in zip(names, inputs.shards):
        rec = manifest.shards.get(name)
        if rec is not None and not rec.read_error and all(
                sizes.get(join(root, p.file)) == p.bytes for p in rec.parts):
            done.append(name)
            continue
        if rec is not None:
            redo.append(name)
        pending[name] = shard
    if cfg.output.verify and done:
        by_name = dict(zip(names, inputs.shards))
        parts = [(join(root, p.file), p.sha256) for name in done for p in manifest.shards[name].parts]
        bad = set((verify_with or mismatched_parts)(cfg.output.path, parts, cfg.s3))
        for name in [n for n in done if any(join(root, p.file) in bad for p in manifest.shards[n].parts)]:
            log.warning("%s: shard %s has parts whose sha256 differs from the manifest's; redoing it", cfg.output.path,
                        name)
            done.remove(name)
            redo.append(name)
            pending[name] = by_name[name]
    kept = sorted(set(manifest.shards) - set(names))
    if kept:
        log.warning("%s: kept %d committed shard(s) that today's inputs do not name (%s%s); they stay in the "
                    "cache and training reads them", cfg.output.path, len(kept), ", ".join(kept[:5]),
                    ", ..." if len(kept) > 5 else "")
    listed = {join(root, p.file) for name, rec in manifest.shards.items() if name not in redo for p in rec.parts}
    return CachePlan(cfg=cfg, inputs=inputs, out=out, manifest=manifest, manifest_exists=existing is not None,
                     pending=pending, done=done, redo=redo, kept=kept, stray=sorted(set(sizes) - listed))


def _check_empty_output(fs: pafs.FileSystem, root: str, cfg: CacheSpec) -> None:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise StorageError(f"output.path {cfg.output.path} is a file; pass a folder or s3:// prefix")
    entries = list_dir(fs, root, recursive=False, s3=cfg.s3) if info.type == pafs.FileType.Directory else []
    if any(not is_atomic_leftover(e.base_name, MANIFEST_NAME) and e.base_name not in (LEASE_DIR, "_lease.json")
           for e in entries):
        raise StorageError(
            f"output.path {cfg.output.path} is not empty and holds no manifest.json; "
            "pass an empty or new folder (or an existing cache)"
        )


def _check_compatible(existing: Manifest, settings: CacheSettings, class_names: list[str] | None, uri: str) -> None:
    diff = settings_diff(existing.settings, settings)
    if diff:
        raise CacheMismatchError(
            f"{uri} already holds a cache made with other settings ({'; '.join(diff)}); "
            "use another output.path, or rerun with the cache's settings"
        )
    if existing.class_names and class_names and existing.class_names != class_names:
        raise CacheMismatchError(
            f"{uri} was cached with classes {existing.class_names[:5]}... but the input folders give "
            f"{class_names[:5]}...: the label indices would disagree; use another output.path"
        )


def prepare_output(plan: CachePlan) -> None:
    """First write of a run: the manifest (new, without the shards to redo, or as it was when there is work to do:
    a new version, so that a job that lost this output can no longer replace it), no stray parts, an empty _tmp/.
    A rerun with nothing to do writes nothing."""
    for name in plan.redo:
        plan.manifest.shards.pop(name, None)
    try:
        if plan.redo or plan.pending or not plan.manifest_exists:
            plan.out.save_manifest(plan.manifest)
        plan.out.delete(plan.stray, "the removal of part files no manifest record lists")
        plan.out.clear_tmp()  # a killed run's leftovers
    except OSError as err:  # e.g. credentials that may read but not write
        raise translate_error(err, plan.root_uri, plan.cfg.s3) from None

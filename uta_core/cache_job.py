"""The teacher-feature caching job without Ray: config, planning, the per-shard work, the commit.

``pipelines/cache_teacher.py`` wires these pieces into a Ray Data pipeline:

1. ``plan_cache`` (driver): resolve inputs and output, build the teacher once for its
   geometry and weights fingerprint, compare with an existing manifest (refusing other
   settings), and split the input shards into done and pending. Writes nothing, so a
   missing path, a missing bucket or refused credentials fail before any side effect.
2. ``shard_view_tables`` (CPU tasks): stream one input shard, decode, skip + count bad
   samples, sample V seeded views per image, encode them; the shard's stats go to
   ``<root>/_tmp/<name>.stats.json`` *before* its last rows are emitted, and those last
   rows carry the shard's total row count in-band (``_shard_rows``).
3. ``TokenEncoder`` (GPU/CPU actors): decode the stored view bytes, run the teacher,
   append fp16 or int8 tokens.
4. ``ShardCommitter`` (driver): append rows to one temporary parquet per shard; once a
   shard's (deduplicated) row count reaches its announced total, close, commit
   (rename / S3 copy) and record it in the manifest. Commits therefore stream as shards
   finish, in any order, with exact per-shard counts.

Shape legend: B views in a batch, H/W view pixels, T = 1+N tokens, D embed dim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from uta_core.cache_format import (
    SHARDS_DIR,
    TMP_DIR,
    TOKENS_PARQUET_ENCODING,
    VIEW_SCHEMA,
    CacheSettings,
    Manifest,
    ShardRecord,
    cache_schema,
    decode_pixels,
    encode_view,
    load_manifest,
    now,
    save_manifest,
    settings_diff,
    shard_path,
    tmp_path,
    tokens_array,
    tokens_to_storage,
)
from uta_core.data import ImageDecodeError, ViewConfig, decode_image, sample_views, to_model_input
from uta_core.shards import InputConfig, InputSet, InputShard, ShardReadError, discover, iter_samples, shard_names
from uta_core.storage import (
    S3Options,
    StorageError,
    check_bucket,
    commit_file,
    delete_file,
    filesystem_for,
    join,
    list_dir,
    open_hashing_sink,
    read_bytes,
    remove_dir,
    to_uri,
    translate_error,
    write_bytes_atomic,
)
from uta_core.teacher import Teacher, TeacherConfig
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.cache")
SHARD_COLUMN, TOTAL_COLUMN = "_shard", "_shard_rows"  # in-band bookkeeping, never written
_MAX_ERRORS = 10  # skip reasons kept per shard in the manifest


# --------------------------------------------------------------------- config
@dataclass(kw_only=True)
class OutputConfig:
    path: str = ""  # local folder or s3://bucket/prefix
    token_dtype: Literal["float16", "int8"] = "float16"
    pixel_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 95
    compression: Literal["none", "zstd", "snappy"] = "zstd"
    row_group_mb: int = 64  # rows are buffered per shard up to this size before a write

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path is empty: pass output.path=<folder or s3://bucket/prefix>")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.row_group_mb < 1:
            raise ValueError(f"row_group_mb must be at least 1, got {self.row_group_mb}")


@dataclass(kw_only=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS (ray job submit), else a new local Ray
    num_cpus: int | None = None  # local Ray only; None = all cores
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs
    num_actors: int | None = None  # teacher actors; None: one per GPU, or 1 on CPU
    actor_num_cpus: float | None = None  # None: 1 with GPUs; on CPU half the cores, >= 0.5
    actor_threads: int | None = None  # torch threads per actor; None: on CPU the node's cores / actors
    read_num_cpus: float = 1.0  # per decode/view task
    batch_size: int = 64  # views per teacher forward
    images_per_block: int = 64  # read tasks emit blocks of this many images' views
    progress_bars: bool = True

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_actors", "actor_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or null), got {value}")
        if self.actor_num_cpus is not None and self.actor_num_cpus <= 0:
            raise ValueError(f"actor_num_cpus must be positive, got {self.actor_num_cpus}")
        if self.read_num_cpus <= 0:
            raise ValueError(f"read_num_cpus must be positive, got {self.read_num_cpus}")
        if self.batch_size < 1 or self.images_per_block < 1:
            raise ValueError("batch_size and images_per_block must be at least 1")


@dataclass(kw_only=True)
class CacheConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_random_seed: int | None = None  # int: allow random-init weights (tests, smoke runs)
    views: ViewConfig = field(default_factory=ViewConfig)
    num_views: int = 2
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {self.num_views}")
        if self.teacher.image_size not in (None, self.views.size):
            raise ValueError(
                f"teacher.image_size={self.teacher.image_size} differs from views.size={self.views.size}: "
                "the teacher runs at the view resolution; leave teacher.image_size null"
            )
        carries_weights = self.teacher.arch.startswith(("hf-hub:", "local-dir:"))
        if self.teacher.pretrained is None and not carries_weights and self.teacher_random_seed is None:
            raise ValueError(
                "teacher.pretrained is null, i.e. random weights: set teacher.pretrained=<tag, path or "
                "s3:// URI>, or teacher_random_seed=<int> to cache a random-init teacher on purpose"
            )

    @property
    def teacher_config(self) -> TeacherConfig:
        return dataclasses.replace(self.teacher, image_size=self.views.size)


def build_teacher(cfg: CacheConfig, device: str | torch.device = "cpu") -> Teacher:
    """The frozen teacher at the view resolution; random-init weights are seeded, so every
    actor builds the same ones (checked against the driver's fingerprint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.teacher_random_seed or 0)
        teacher = Teacher.from_config(cfg.teacher_config, device="cpu", s3_endpoint_url=cfg.s3.endpoint_url)
    return teacher.to(device)


def cache_settings(cfg: CacheConfig, teacher: Teacher) -> CacheSettings:
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
        token_dtype=cfg.output.token_dtype,
        pixel_format=cfg.output.pixel_format,
        views=views,
    )


# --------------------------------------------------------------------- planning (driver)
class CacheMismatchError(ValueError):
    """The output already holds a cache made with other settings."""


@dataclass(kw_only=True)
class CachePlan:
    cfg: CacheConfig
    inputs: InputSet
    fs: pafs.FileSystem  # output filesystem
    root: str  # scheme-less output root
    manifest: Manifest
    manifest_exists: bool
    pending: dict[str, InputShard]  # name -> shard still to do
    done: list[str]  # names already committed
    redo: list[str]  # names whose committed file vanished or changed

    @property
    def root_uri(self) -> str:
        return to_uri(self.fs, self.root)


def plan_cache(cfg: CacheConfig, teacher: Teacher | None = None) -> CachePlan:
    """Everything that can fail before work starts fails here; nothing is written."""
    inputs = discover(cfg.input, cfg.s3)
    fs, root = filesystem_for(cfg.output.path, cfg.s3)
    check_bucket(fs, root, cfg.s3)
    try:
        existing = load_manifest(fs, root)
        if existing is None:
            _check_empty_output(fs, root, cfg)
    except OSError as err:
        raise translate_error(err, cfg.output.path, cfg.s3) from None
    teacher = teacher or build_teacher(cfg)
    settings = cache_settings(cfg, teacher)
    if existing is not None:
        _check_compatible(existing, settings, inputs.class_names, cfg.output.path)
    manifest = existing or Manifest(settings=settings, class_names=inputs.class_names)
    committed_sources = {name: rec.source for name, rec in manifest.shards.items()}
    names = shard_names([s.uri for s in inputs.shards], committed_sources)
    sizes = {info.path: info.size for info in list_dir(fs, join(root, SHARDS_DIR), recursive=False, s3=cfg.s3)}
    pending, done, redo = {}, [], []
    for name, shard in zip(names, inputs.shards):
        rec = manifest.shards.get(name)
        if rec is not None and sizes.get(shard_path(root, name)) == rec.bytes:
            done.append(name)
            continue
        if rec is not None:
            redo.append(name)
        pending[name] = shard
    return CachePlan(cfg=cfg, inputs=inputs, fs=fs, root=root, manifest=manifest,
                     manifest_exists=existing is not None, pending=pending, done=done, redo=redo)


def _check_empty_output(fs: pafs.FileSystem, root: str, cfg: CacheConfig) -> None:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise StorageError(f"output.path {cfg.output.path} is a file; pass a folder or s3:// prefix")
    if info.type == pafs.FileType.Directory and list_dir(fs, root, recursive=False, s3=cfg.s3):
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


def begin(plan: CachePlan) -> None:
    """First write of a run: manifest (new, or without vanished shards) and an empty _tmp/."""
    for name in plan.redo:
        plan.manifest.shards.pop(name, None)
    try:
        if not plan.manifest_exists or plan.redo:
            save_manifest(plan.fs, plan.root, plan.manifest)
        remove_dir(plan.fs, join(plan.root, TMP_DIR))  # a killed run's leftovers
    except OSError as err:  # e.g. credentials that may read but not write
        raise translate_error(err, plan.root_uri, plan.cfg.s3) from None


# --------------------------------------------------------------------- read + views (CPU tasks)
@dataclass(frozen=True, kw_only=True)
class ViewTask:
    """What a decode/view task needs; small and picklable (no filesystem objects)."""

    input: InputConfig
    views: ViewConfig
    num_views: int
    pixel_format: str
    jpeg_quality: int
    root_uri: str
    s3: S3Options
    images_per_block: int

    @classmethod
    def from_plan(cls, plan: CachePlan) -> ViewTask:
        cfg = plan.cfg
        return cls(input=cfg.input, views=cfg.views, num_views=cfg.num_views,
                   pixel_format=cfg.output.pixel_format, jpeg_quality=cfg.output.jpeg_quality,
                   root_uri=cfg.output.path, s3=cfg.s3, images_per_block=cfg.ray.images_per_block)


@dataclass(kw_only=True)
class ShardStats:
    source: str
    images: int = 0
    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        self.skipped += 1
        self.note(f"{key}: {reason}")

    def note(self, message: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(message[:300])


def shard_view_tables(task: ViewTask, name: str, shard: InputShard) -> Iterator[pa.Table]:
    """One input shard -> tables of view rows (+ ``_shard``, ``_shard_rows``); stats to _tmp/."""
    fs_in, _ = filesystem_for(shard.uri, task.s3)
    stats, seen, rows, held = ShardStats(source=shard.uri), set(), [], None
    try:
        for sample in iter_samples(fs_in, shard, task.input):
            if sample.key in seen:
                stats.skip(sample.key, "duplicate key in the shard")
                continue
            seen.add(sample.key)
            try:
                if sample.image is None:
                    raise ImageDecodeError("the sample has no image")
                img = decode_image(sample.image)
            except ImageDecodeError as err:
                stats.skip(sample.key, str(err))
                continue
            stats.images += 1
            rows += _view_rows(task, sample, img)
            if len(rows) >= task.images_per_block * task.num_views:
                if held is not None:  # hold one block back: the last one announces the total
                    yield held
                held, rows = _view_table(name, rows, -1), []
    except ShardReadError as err:
        stats.note(str(err))
        log.warning("%s: %s; keeping the %d images read before it", name, err, stats.images)
    if rows:
        if held is not None:
            yield held
        held = _view_table(name, rows, -1)
    stats.rows = stats.images * task.num_views
    if stats.skipped:
        log.warning("%s: skipped %d samples, e.g. %s", name, stats.skipped, "; ".join(stats.errors[:3]))
    fs_out, root = filesystem_for(task.root_uri, task.s3)
    write_bytes_atomic(fs_out, tmp_path(root, name, ".stats.json"), json.dumps(dataclasses.asdict(stats)).encode())
    if held is not None:
        yield held.set_column(held.schema.get_field_index(TOTAL_COLUMN), TOTAL_COLUMN,
                              pa.array(np.full(held.num_rows, stats.rows, dtype=np.int64)))


def _view_rows(task: ViewTask, sample, img) -> list[dict[str, Any]]:
    rows = []
    for v, (params, pixels_HW3) in enumerate(sample_views(img, sample.key, task.num_views, task.views)):
        rows.append({
            "key": sample.key, "view": v, "crop_top": params.top, "crop_left": params.left,
            "crop_height": params.height, "crop_width": params.width, "flip": params.flip,
            "pixels": encode_view(pixels_HW3, task.pixel_format, task.jpeg_quality),
            "label": sample.label, "caption": sample.caption,
        })
    return rows


def _view_table(name: str, rows: list[dict[str, Any]], total: int) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=VIEW_SCHEMA)
    table = table.append_column(SHARD_COLUMN, pa.array([name] * len(rows), pa.string()))
    return table.append_column(TOTAL_COLUMN, pa.array(np.full(len(rows), total, dtype=np.int64)))


# --------------------------------------------------------------------- teacher (actors)
class TokenEncoder:
    """Builds the teacher once; maps a table of view rows to the same rows + ``tokens``."""

    def __init__(self, cfg: CacheConfig, *, device: str, fingerprint: str, num_threads: int | None = None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.teacher = build_teacher(cfg, device)
        if self.teacher.weights_fingerprint() != fingerprint:
            raise RuntimeError(
                f"this worker built teacher weights {self.teacher.weights_fingerprint()} but the driver "
                f"planned with {fingerprint}: the weights source ({cfg.teacher.pretrained}) differs between "
                "machines; make it identical everywhere (e.g. an s3:// path)"
            )
        self.token_dtype = cfg.output.token_dtype
        self.device = torch.device(device)

    def encode(self, pixels_BHW3: np.ndarray) -> np.ndarray:
        """uint8 views -> stored tokens (B, T, D) in the cache's dtype."""
        x_BHW3 = torch.from_numpy(pixels_BHW3).to(self.device, non_blocking=True)
        x_B3HW = to_model_input(x_BHW3, self.teacher.mean, self.teacher.std)
        return tokens_to_storage(self.teacher.encode_tokens(x_B3HW), self.token_dtype)

    def __call__(self, table: pa.Table) -> pa.Table:
        # Decode what is stored, so the tokens match the cached pixels even for JPEG.
        stored_BTD = self.encode(decode_pixels(table.column("pixels").to_pylist()))
        return table.append_column("tokens", tokens_array(stored_BTD))


# --------------------------------------------------------------------- commit (driver)
@dataclass(kw_only=True)
class CacheResult:
    committed: list[str] = field(default_factory=list)  # shards written by this run
    incomplete: list[str] = field(default_factory=list)  # shards left for a rerun
    images: int = 0
    views: int = 0
    skipped: int = 0
    bytes_written: int = 0


@dataclass(kw_only=True)
class _OpenShard:
    sink: Any
    writer: pq.ParquetWriter
    seen: set = field(default_factory=set)
    rows: int = 0
    expected: int | None = None
    buffer: list = field(default_factory=list)
    buffered_bytes: int = 0


class ShardCommitter:
    """Driver side: rows of many shards in, one committed parquet per finished shard out."""

    def __init__(self, plan: CachePlan, *, compute: str) -> None:
        self.plan, self.compute = plan, compute
        self.fs, self.root = plan.fs, plan.root
        self.schema = cache_schema(plan.manifest.settings)
        self.row_group_bytes = plan.cfg.output.row_group_mb << 20
        self.open: dict[str, _OpenShard] = {}
        self.result = CacheResult()

    def add(self, table: pa.Table) -> None:
        for name in pc.unique(table.column(SHARD_COLUMN)).to_pylist():
            part = table.filter(pc.equal(table.column(SHARD_COLUMN), name))
            self._add_part(name, part)

    def _add_part(self, name: str, part: pa.Table) -> None:
        if name not in self.plan.pending:
            raise RuntimeError(f"rows for unexpected shard {name!r}")
        if name in self.result.committed:  # a retried task re-emitted rows of a finished shard
            return
        shard = self.open.get(name) or self._start(name)
        total = pc.max(part.column(TOTAL_COLUMN)).as_py()
        if total >= 0:
            shard.expected = total
        fresh = [(k, v) not in shard.seen for k, v in zip(part.column("key").to_pylist(), part.column("view").to_pylist())]
        if not all(fresh):  # a retried task may re-emit rows
            part = part.filter(pa.array(fresh))
        shard.seen.update(zip(part.column("key").to_pylist(), part.column("view").to_pylist()))
        rows = pa.Table.from_arrays([part.column(n) for n in self.schema.names], schema=self.schema)
        shard.buffer.append(rows)
        shard.buffered_bytes += rows.nbytes
        shard.rows += rows.num_rows
        if shard.buffered_bytes >= self.row_group_bytes:
            self._flush(shard)
        if shard.expected is not None and shard.rows >= shard.expected:
            self._commit(name)

    def _start(self, name: str) -> _OpenShard:
        sink = open_hashing_sink(self.fs, tmp_path(self.root, name))
        small = [n for n in self.schema.names if n not in ("pixels", "tokens", "caption")]
        codec = self.plan.cfg.output.compression
        writer = pq.ParquetWriter(sink, self.schema, compression=codec, use_dictionary=False, write_statistics=small,
                                  column_encoding=TOKENS_PARQUET_ENCODING)
        self.open[name] = _OpenShard(sink=sink, writer=writer)
        return self.open[name]

    def _flush(self, shard: _OpenShard) -> None:
        if shard.buffer:
            table = pa.concat_tables(shard.buffer)
            shard.writer.write_table(table, row_group_size=table.num_rows)
            shard.buffer, shard.buffered_bytes = [], 0

    def _commit(self, name: str) -> None:
        shard = self.open.pop(name)
        self._flush(shard)
        shard.writer.close()
        shard.sink.close()
        stats = self._stats(name)
        if stats is None or stats["rows"] != shard.rows:
            raise RuntimeError(f"{name}: wrote {shard.rows} rows but the reader reported {stats}")
        commit_file(self.fs, tmp_path(self.root, name), shard_path(self.root, name), self.plan.cfg.s3)
        record = ShardRecord(source=stats["source"], rows=shard.rows, images=stats["images"],
                             skipped=stats["skipped"], errors=stats["errors"], sha256=shard.sink.sha256,
                             bytes=shard.sink.bytes, committed_at=now(), compute=self.compute)
        self.plan.manifest.shards[name] = record
        save_manifest(self.fs, self.root, self.plan.manifest)
        delete_file(self.fs, tmp_path(self.root, name, ".stats.json"))
        r = self.result
        r.committed.append(name)
        r.images, r.views, r.skipped = r.images + record.images, r.views + record.rows, r.skipped + record.skipped
        r.bytes_written += record.bytes
        log.info("committed %s: %d images, %d views, %d skipped, %.1f MB",
                 name, record.images, record.rows, record.skipped, record.bytes / 1e6)

    def _stats(self, name: str) -> dict | None:
        data = read_bytes(self.fs, tmp_path(self.root, name, ".stats.json"))
        return None if data is None else json.loads(data)

    def finish(self) -> CacheResult:
        """After the stream ends: commit shards that had no valid image; report the rest."""
        for name in self.plan.pending:
            if name in self.result.committed or name in self.open:
                continue
            stats = self._stats(name)
            if stats is not None and stats["rows"] == 0:
                self._start(name)
                self._commit(name)
            else:
                self.result.incomplete.append(name)
        for name in list(self.open):
            log.error("%s: got %d of %s rows; it will be redone on rerun", name, self.open[name].rows,
                      self.open[name].expected)
            self.result.incomplete.append(name)
        self.abort()
        if not self.result.incomplete:  # keep the stats of unfinished shards for a post-mortem
            remove_dir(self.fs, join(self.root, TMP_DIR))
        return self.result

    def abort(self) -> None:
        """Drop the temporary files of unfinished shards (never commit a partial shard)."""
        for name, shard in list(self.open.items()):
            try:  # close (the file is deleted next), so nothing writes to it when collected
                shard.writer.close()
                shard.sink.close()
            except (OSError, ValueError):
                pass
            delete_file(self.fs, tmp_path(self.root, name))
            self.open.pop(name)


def summary(result: CacheResult, seconds: float) -> dict[str, float]:
    return {
        "images": result.images, "views": result.views, "skipped": result.skipped,
        "shards_committed": len(result.committed), "shards_incomplete": len(result.incomplete),
        "seconds": seconds, "images_per_s": result.images / seconds if seconds > 0 else math.nan,
        "bytes_written": result.bytes_written,
        "bytes_per_view": result.bytes_written / result.views if result.views else math.nan,
    }

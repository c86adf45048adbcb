"""Writing a teacher cache (Ray-free): views on CPU tasks, tokens on teacher actors, part files
from write tasks; the caching job (``pipelines/lib/cache/job.py``) runs them on Ray Data.

``shard_view_tables`` streams one input shard, decodes, skips and counts bad samples,
samples V seeded views per image and encodes them; the shard's stats go to
``<root>/_tmp/<name>.stats.json`` *before* its last rows are emitted, and those last rows
carry the shard's total row count in-band (``_shard_rows``). Every row carries its place in
the shard (``_seq`` = image ordinal x V + view) and the pixels the teacher must see
(``_raw``: the stored view decoded once, here, on a CPU task). ``TokenEncoder`` runs the
teacher on ``_raw`` and appends the encoded tokens; ``PartWriter`` writes each shard's rows
of a block straight to storage and hands on only metadata (``PART_SCHEMA``).

Shape legend: B views in a batch, H/W view pixels, T = 1+N tokens, D embed dim.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from uta_core.cache.codecs import BASIS_FILE, TokenCodec, basis_sha256, fit_basis, token_cosine
from uta_core.cache.commit import CacheResult, ShardCommitter
from uta_core.cache.format import (
    VIEW_SCHEMA,
    CacheSettings,
    byte_rows,
    cache_schema,
    load_codec,
    shard_dir,
    store_view,
    tmp_path,
    tokens_array,
)
from uta_core.cache.plan import CachePlan, CacheSpec, build_cache_teacher, plan_cache, prepare_output
from uta_core.cache.sink import open_hashing_sink
from uta_core.data.prefetch import pin
from uta_core.data.samples import SampleStats, decoded_samples
from uta_core.data.shards import InputConfig, InputShard
from uta_core.data.storage import S3Options, filesystem_for, join, write_bytes_atomic
from uta_core.data.views import ViewConfig, sample_views, to_model_input
from uta_core.device import require_cuda
from uta_core.lease import Fence, Lease

log = logging.getLogger("uta.cache")
SHARD_COLUMN, TOTAL_COLUMN, SEQ_COLUMN, RAW_COLUMN = "_shard", "_shard_rows", "_seq", "_raw"  # never written
# What a write task hands on to the driver: one row per part file, no pixels, no tokens.
PART_SCHEMA = pa.schema([
    pa.field("shard", pa.string()), pa.field("file", pa.string()), pa.field("rows", pa.int64()),
    pa.field("bytes", pa.int64()), pa.field("sha256", pa.string()), pa.field("xxh3_128", pa.string()),
    pa.field("total", pa.int64()),
    pa.field("seq_ranges", pa.string()),  # JSON [[first, end), ...] of the shard rows in the part
])


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
    fence: Fence | None = None  # the job's lease: checked before the task writes (a deposed job's tasks stop)

    @classmethod
    def from_plan(cls, plan: CachePlan, images_per_block: int) -> ViewTask:
        cfg = plan.cfg
        return cls(input=cfg.input, views=cfg.views, num_views=cfg.num_views,
                   pixel_format=cfg.output.pixel_format, jpeg_quality=cfg.output.jpeg_quality,
                   root_uri=cfg.output.path, s3=cfg.s3, images_per_block=images_per_block, fence=plan.out.fence)


def shard_view_tables(task: ViewTask, name: str, shard: InputShard) -> Iterator[pa.Table]:
    """One input shard -> tables of view rows (+ ``_shard``, ``_shard_rows``); stats to _tmp/."""
    fs_in, _ = filesystem_for(shard.uri, task.s3)
    stats, rows, held = SampleStats(source=shard.uri), [], None
    for _, sample, img in decoded_samples(fs_in, shard, task.input, stats=stats, unique_keys=True):
        rows += _view_rows(task, sample, img, stats.images - 1)
        if len(rows) >= task.images_per_block * task.num_views:
            if held is not None:  # hold one block back: the last one announces the total
                yield held
            held, rows = _view_table(name, rows, -1), []
    if rows:
        if held is not None:
            yield held
        held = _view_table(name, rows, -1)
    fs_out, root = filesystem_for(task.root_uri, task.s3)
    shard_rows = stats.images * task.num_views
    record = {**dataclasses.asdict(stats), "rows": shard_rows}
    if task.fence is not None:
        task.fence.check(f"the stats of shard {name}")
    write_bytes_atomic(fs_out, tmp_path(root, name, ".stats.json"), json.dumps(record).encode())
    if held is not None:
        yield held.set_column(held.schema.get_field_index(TOTAL_COLUMN), TOTAL_COLUMN,
                              pa.array(np.full(held.num_rows, shard_rows, dtype=np.int64)))


def _view_rows(task: ViewTask, sample, img, ordinal: int) -> list[dict[str, Any]]:
    rows = []
    for v, (params, pixels_HW3) in enumerate(sample_views(img, sample.key, task.num_views, task.views)):
        encoded, seen_HW3 = store_view(pixels_HW3, task.pixel_format, task.jpeg_quality)
        rows.append({
            "key": sample.key, "view": v, "crop_top": params.top, "crop_left": params.left,
            "crop_height": params.height, "crop_width": params.width, "flip": params.flip,
            "pixels": encoded, "label": sample.label, "caption": sample.caption,
            SEQ_COLUMN: ordinal * task.num_views + v,
            RAW_COLUMN: seen_HW3,  # what the teacher sees: the stored view as every reader decodes it
        })
    return rows


def _view_table(name: str, rows: list[dict[str, Any]], total: int) -> pa.Table:
    raw_BHW3 = np.stack([r.pop(RAW_COLUMN) for r in rows])
    seq = np.asarray([r.pop(SEQ_COLUMN) for r in rows], dtype=np.int64)
    table = pa.Table.from_pylist(rows, schema=VIEW_SCHEMA)
    table = table.append_column(SHARD_COLUMN, pa.array([name] * len(rows), pa.string()))
    table = table.append_column(SEQ_COLUMN, pa.array(seq))
    table = table.append_column(RAW_COLUMN, tokens_array(raw_BHW3.reshape(len(rows), -1)))
    return table.append_column(TOTAL_COLUMN, pa.array(np.full(len(rows), total, dtype=np.int64)))


def fit_cache_basis(
    cfg: CacheSpec, shards: list[InputShard], *, device: str, num_threads: int | None = None
) -> tuple[bytes, dict[str, float]]:
    """The lowrank_int8 basis (safetensors bytes): PCA of the teacher's patch tokens on the first
    ``output.basis_views`` views of ``shards``, the views the cache will hold (same seeds); and
    the cosine of restored vs original tokens on those views (the manifest states it)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    views = list(itertools.islice(_stored_views(cfg, shards), cfg.output.basis_views))
    if not views:
        raise ValueError(f"no decodable image in {[s.uri for s in shards[:3]]}...: cannot fit the token basis")
    return fit_views_basis(build_cache_teacher(cfg, device), views, cfg.output.token_rank, device)


def fit_views_basis(teacher, views: list[np.ndarray], rank: int, device: torch.device | str) -> tuple[bytes, dict]:
    """The lowrank_int8 basis (safetensors bytes) of ``teacher``'s patch tokens on ``views`` (uint8 HW3),
    and the cosine of restored vs original tokens on them (what a cache's manifest or a run states)."""
    tokens_BTD = torch.cat([teacher_tokens(teacher, np.stack(views[i:i + 64]), device).float().cpu()
                            for i in range(0, len(views), 64)])
    basis = fit_basis(tokens_BTD, rank)
    codec = TokenCodec(name="lowrank_int8", token_shape=tuple(tokens_BTD.shape[1:]), basis=basis)
    cosine = token_cosine(codec.decode(codec.encode(tokens_BTD)), tokens_BTD)
    return basis.to_bytes(), {"views": len(views), "patch_cosine_mean": round(cosine["patch_mean"], 5),
                              "patch_cosine_min": round(cosine["patch_min"], 5)}


def _stored_views(cfg: CacheSpec, shards: list[InputShard]) -> Iterator[np.ndarray]:
    """The cache's views of ``shards`` as the teacher sees them (decoded JPEG for a JPEG cache)."""
    for shard in shards:
        fs, _ = filesystem_for(shard.uri, cfg.s3)
        for _, sample, img in decoded_samples(fs, shard, cfg.input, unique_keys=True):
            for _, pixels_HW3 in sample_views(img, sample.key, cfg.num_views, cfg.views):
                yield store_view(pixels_HW3, cfg.output.pixel_format, cfg.output.jpeg_quality)[1]


def teacher_tokens(teacher, pixels_BHW3: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 views on the host -> the teacher's tokens on ``device`` (pinned copy on CUDA)."""
    x_BHW3 = pin(torch.from_numpy(pixels_BHW3), torch.device(device))
    x_B3HW = to_model_input(x_BHW3.to(device, non_blocking=True), teacher.mean, teacher.std)
    return teacher.encode_tokens(x_B3HW)


class TokenEncoder:
    """Builds the teacher once; maps a table of view rows to the same rows + ``tokens`` (the codec's bytes)."""

    def __init__(self, cfg: CacheSpec, codec: TokenCodec, *, device: str, fingerprint: str,
                 num_threads: int | None = None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if torch.device(device).type == "cuda":
            require_cuda("the teacher actor (ray.device=cuda)")
        self.teacher = build_cache_teacher(cfg, device)
        if self.teacher.weights_fingerprint() != fingerprint:
            raise RuntimeError(
                f"this worker built teacher weights {self.teacher.weights_fingerprint()} but the driver "
                f"planned with {fingerprint}: the weights source ({cfg.teacher.pretrained}) differs between "
                "machines; make it identical everywhere (e.g. an s3:// path)"
            )
        self.codec, self.size = codec, cfg.views.size
        self.device = torch.device(device)

    def encode(self, pixels_BHW3: np.ndarray) -> np.ndarray:
        """uint8 views -> stored tokens (B, bytes_per_view) uint8."""
        return self.codec.encode(teacher_tokens(self.teacher, pixels_BHW3, self.device))

    def __call__(self, table: pa.Table) -> pa.Table:
        raw_BHW3 = byte_rows(table.column(RAW_COLUMN)).reshape(-1, self.size, self.size, 3)
        table = table.drop_columns([RAW_COLUMN])
        return table.append_column("tokens", tokens_array(self.encode(raw_BHW3)))


def seq_ranges(seq: np.ndarray) -> list[list[int]]:
    """Sorted unique row numbers -> [[first, end), ...] runs."""
    if len(seq) == 0:
        return []
    runs = np.split(seq, np.flatnonzero(np.diff(seq) != 1) + 1)
    return [[int(run[0]), int(run[-1]) + 1] for run in runs]


@dataclass(frozen=True, kw_only=True)
class PartWriter:
    """A write task: the rows of each shard in a block -> one part file per shard, straight to
    storage; returns their metadata only. Names are unique, so a retried task never overwrites
    a part the driver may have accepted; the driver drops parts whose rows it already has."""

    root_uri: str
    s3: S3Options
    settings: CacheSettings
    bytes_per_view: int
    compression: str  # every column but the tokens
    token_compression: str
    row_group_mb: int
    fence: Fence | None = None  # the job's lease: checked before each part file

    def __call__(self, table: pa.Table) -> pa.Table:
        fs, root = filesystem_for(self.root_uri, self.s3)
        schema = cache_schema(self.settings, self.bytes_per_view)
        out = []
        shards = table.column(SHARD_COLUMN).to_numpy(zero_copy_only=False)
        for name in sorted(set(shards.tolist())):
            part = table.filter(pa.array(shards == name))
            part = part.take(pa.array(np.argsort(part.column(SEQ_COLUMN).to_numpy(), kind="stable")))
            seq = part.column(SEQ_COLUMN).to_numpy()
            file = f"{shard_dir(name)}/{int(seq[0]):09d}-{int(seq[-1]):09d}-{uuid.uuid4().hex[:8]}.parquet"
            if self.fence is not None:
                self.fence.check(file)
            sink = open_hashing_sink(fs, join(root, file))
            rows = pa.Table.from_arrays([part.column(n) for n in schema.names], schema=schema)
            small = [n for n in schema.names if n not in ("pixels", "tokens", "caption")]
            codecs = {n: self.token_compression if n == "tokens" else self.compression for n in schema.names}
            with pq.ParquetWriter(sink, schema, compression=codecs, use_dictionary=False,
                                  write_statistics=small) as writer:
                per_group = max(1, (self.row_group_mb << 20) // max(1, rows.nbytes // max(1, rows.num_rows)))
                writer.write_table(rows, row_group_size=per_group)
            sink.close()
            out.append({"shard": name, "file": file, "rows": part.num_rows, "bytes": sink.bytes,
                        "sha256": sink.sha256, "xxh3_128": sink.xxh3_128,
                        "total": int(pc.max(part.column(TOTAL_COLUMN)).as_py()),
                        "seq_ranges": json.dumps(seq_ranges(np.unique(seq)))})
        return pa.Table.from_pylist(out, schema=PART_SCHEMA)


def cache_codec(plan: CachePlan, fit: Callable[[CacheSpec, list[InputShard]], tuple[bytes, dict]]) -> TokenCodec:
    """The cache's codec; for lowrank_int8 without a basis yet, ``fit(cfg, shards)`` fits it once
    (``fit_cache_basis``, where the teacher may run) and it is stored with the manifest."""
    cfg, manifest = plan.cfg, plan.manifest
    if manifest.settings.token_codec == "lowrank_int8" and manifest.token_basis is None:
        log.info("fitting the rank-%d token basis on %d views of the first input shards", cfg.output.token_rank,
                 cfg.output.basis_views)
        data, fit_stats = fit(cfg, list(plan.pending.values()))
        plan.out.write(BASIS_FILE, data)
        manifest.token_basis = {"file": BASIS_FILE, "sha256": basis_sha256(data), "rank": cfg.output.token_rank,
                                **fit_stats}
        plan.out.save_manifest(manifest)
        log.info("token basis: rank %d, patch-token cosine %.4f (mean) / %.4f (min) on %d views",
                 cfg.output.token_rank, fit_stats["patch_cosine_mean"], fit_stats["patch_cosine_min"],
                 fit_stats["views"])
    return load_codec(plan.fs, plan.root, manifest)


def write_in_process(cfg: CacheSpec, images_per_block: int = 64) -> CacheResult:
    """A whole cache written by this module's pieces, serially in this process (no Ray): views ->
    teacher tokens -> part files -> commits, as the caching job's Ray Data pipeline runs them.
    For small caches, tests and benchmarks; the job (``pipelines/cache_teacher.py``) scales."""
    with Lease(cfg.output.path, cfg.s3, "output.path", cfg.output.lease).held() as lease:
        return _write_in_process(cfg, images_per_block, lease)


def _write_in_process(cfg: CacheSpec, images_per_block: int, lease: Lease) -> CacheResult:
    plan = plan_cache(cfg, lease=lease)
    prepare_output(plan)
    codec = cache_codec(plan, lambda *args: fit_cache_basis(*args, device="cpu"))
    encoder = TokenEncoder(cfg, codec, device="cpu", fingerprint=plan.manifest.settings.teacher["fingerprint"])
    out = cfg.output
    writer = PartWriter(root_uri=out.path, s3=cfg.s3, settings=plan.manifest.settings,
                        bytes_per_view=codec.bytes_per_view, compression=out.compression,
                        token_compression=out.token_compression, row_group_mb=out.row_group_mb,
                        fence=plan.out.fence)
    task = ViewTask.from_plan(plan, images_per_block=images_per_block)
    committer = ShardCommitter(plan, compute="cpu fp32", save_every_s=0)
    try:
        for name, shard in plan.pending.items():
            for table in shard_view_tables(task, name, shard):
                committer.add(writer(encoder(table)))
    except BaseException as err:
        committer.abort(err)
        raise
    return committer.finish()

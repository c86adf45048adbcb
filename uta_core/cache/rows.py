"""The per-shard work of the caching job (Ray-free): views on CPU tasks, tokens on teacher actors.

``shard_view_tables`` streams one input shard, decodes, skips and counts bad samples,
samples V seeded views per image and encodes them; the shard's stats go to
``<root>/_tmp/<name>.stats.json`` *before* its last rows are emitted, and those last rows
carry the shard's total row count in-band (``_shard_rows``). ``TokenEncoder`` decodes the
stored view bytes, runs the teacher and appends fp16 or int8 tokens.

Shape legend: B views in a batch, H/W view pixels, T = 1+N tokens, D embed dim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from uta_core.cache.format import VIEW_SCHEMA, decode_pixels, encode_view, tmp_path, tokens_array, tokens_to_storage
from uta_core.cache.plan import CachePlan, CacheSpec, build_cache_teacher
from uta_core.data.shards import InputConfig, InputShard, ShardReadError, iter_samples
from uta_core.data.storage import S3Options, filesystem_for, write_bytes_atomic
from uta_core.data.views import ImageDecodeError, ViewConfig, decode_image, sample_views, to_model_input
from uta_core.device import require_cuda

log = logging.getLogger("uta.cache")
SHARD_COLUMN, TOTAL_COLUMN = "_shard", "_shard_rows"  # in-band bookkeeping, never written
_MAX_ERRORS = 10  # skip reasons kept per shard in the manifest


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
    def from_plan(cls, plan: CachePlan, images_per_block: int) -> ViewTask:
        cfg = plan.cfg
        return cls(input=cfg.input, views=cfg.views, num_views=cfg.num_views,
                   pixel_format=cfg.output.pixel_format, jpeg_quality=cfg.output.jpeg_quality,
                   root_uri=cfg.output.path, s3=cfg.s3, images_per_block=images_per_block)


@dataclass(kw_only=True)
class ShardStats:
    source: str
    images: int = 0
    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    read_error: str | None = None  # the container broke: only the images before the damage were read

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
        stats.read_error = str(err)[:300]
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


class TokenEncoder:
    """Builds the teacher once; maps a table of view rows to the same rows + ``tokens``."""

    def __init__(self, cfg: CacheSpec, *, device: str, fingerprint: str, num_threads: int | None = None) -> None:
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

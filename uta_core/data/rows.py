"""Training rows from raw shards (online teacher) or from the teacher cache, and their targets.

Both modes produce the same row columns, so the worker loop does not care where a batch
came from; only ``TeacherTargets`` differs (run the teacher, or restore the stored tokens
with the cache's codec on the training device):

    image       uint8 (H, W, 3)    the view at the student's resolution
    tokens      (S,) uint8         cache mode only: the teacher's tokens in the cache's codec
    label       int64              class index, -1 when the sample has none
    sample_id   int64              stable hash of (key, view): audits which rows a rank saw
    source_pos  int64              which source of the rank's epoch list the row came from
    row_pos     int64              the row's place in that source (``uta_core.data.epochs``)

Online views come from ``uta_core.data.views``, seeded by (seed, epoch, key, view): fresh
every epoch, and in epoch 0 pixel-identical to the cache job's view v of the image.

Shape legend: B rows, H/W view pixels, T = 1+N tokens, D teacher embed dim, M eval images.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from uta_core.cache.codecs import TokenCodec
from uta_core.cache.format import decode_pixels, byte_rows
from uta_core.data.views import (
    ImageDecodeError,
    ViewConfig,
    ViewParams,
    center_view,
    decode_image,
    render_view,
    sample_views,
    to_model_input,
)
from uta_core.data.shards import InputConfig, InputShard, ShardReadError, discover, iter_samples
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.models.teacher import Teacher

log = logging.getLogger("uta.train")
NO_LABEL = -1


def sample_id(key: str, view: int) -> int:
    """Stable 63-bit id of one (image key, view) row, equal in both teacher modes."""
    digest = hashlib.sha256(f"{key}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rows_batch(images: list[np.ndarray], labels: list[int], ids: list[int], rows: list[int], source: int,
                size: int) -> dict[str, np.ndarray]:
    return {
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
        "sample_id": np.asarray(ids, dtype=np.int64),
        "source_pos": np.full(len(rows), source, dtype=np.int64),
        "row_pos": np.asarray(rows, dtype=np.int64),
    }


def online_rows(
    shard: InputShard, input_cfg: InputConfig, views: ViewConfig, num_views: int, s3: S3Options, *,
    epoch: int = 0, start_row: int = 0, source: int = 0, block: int = 64,
) -> Iterator[dict[str, np.ndarray]]:
    """One raw shard -> batches of view rows of ``epoch``; undecodable samples are skipped with a warning.

    Row ``sample_ordinal * num_views + view`` of the shard is its ``row_pos``; rows before
    ``start_row`` are skipped without decoding their image (a resumed epoch).
    """
    fs, _ = filesystem_for(shard.uri, s3)
    images, labels, ids, rows, skipped = [], [], [], [], 0
    first_sample, first_view = divmod(start_row, num_views)
    try:
        for ordinal, sample in enumerate(iter_samples(fs, shard, input_cfg)):
            if ordinal < first_sample:
                continue
            try:
                if sample.image is None:
                    raise ImageDecodeError("the sample has no image")
                img = decode_image(sample.image)
            except ImageDecodeError:
                skipped += 1
                continue
            first = first_view if ordinal == first_sample else 0
            for v, (_, pixels_HW3) in enumerate(sample_views(img, sample.key, num_views, views, epoch, first), first):
                images.append(pixels_HW3)
                labels.append(NO_LABEL if sample.label is None else sample.label)
                ids.append(sample_id(sample.key, v))
                rows.append(ordinal * num_views + v)
            if len(images) >= block:
                yield _rows_batch(images, labels, ids, rows, source, views.size)
                images, labels, ids, rows = [], [], [], []
    except ShardReadError as err:
        log.warning("%s; keeping the samples read before it", err)
    if skipped:
        log.warning("%s: skipped %d undecodable samples", shard.uri, skipped)
    if images:
        yield _rows_batch(images, labels, ids, rows, source, views.size)


CACHE_COLUMNS = ["key", "view", "pixels", "tokens", "label"]
VIEW_COLUMNS = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]


@dataclass(frozen=True, kw_only=True)
class ViewSource:
    """Where the views of a cache without pixels (``pixel_format: none``) are rebuilt from."""

    shard: InputShard  # the input shard the cache job read (its manifest record's ``input_shard``)
    input: InputConfig  # how to read it (format, parquet columns)
    size: int  # the view resolution
    s3: S3Options

    @classmethod
    def of(cls, record: dict, columns: dict, size: int, s3: S3Options) -> ViewSource:
        shard = InputShard(**record)
        return cls(shard=shard, input=InputConfig(paths=[shard.uri], format=shard.format, **columns), size=size, s3=s3)


def rebuilt_views(rows: pa.Table, src: ViewSource) -> Iterator[np.ndarray]:
    """The views of ``rows`` (in shard order, as a part file holds them) rebuilt from the source shard:
    crop, resize, flip of the recorded parameters, exactly the pixels the teacher saw."""
    fs, _ = filesystem_for(src.shard.uri, src.s3)
    samples = iter_samples(fs, src.shard, src.input)
    columns = {c: rows.column(c).to_pylist() for c in ["key", *VIEW_COLUMNS]}
    key, img = None, None
    for i, wanted in enumerate(columns["key"]):
        if wanted != key:
            for sample in samples:  # rows follow the shard's order: undecoded samples are passed over
                if sample.key == wanted:
                    break
            else:
                raise ValueError(
                    f"{src.shard.uri} holds no sample {wanted!r} (any more, or not in this order): this cache stores no "
                    "pixels and rebuilds its views from its input shards, which must stay unchanged; restore the "
                    "input or rebuild the cache with output.pixel_format=jpeg"
                )
            key, img = wanted, decode_image(sample.image)
        params = ViewParams(top=columns["crop_top"][i], left=columns["crop_left"][i], height=columns["crop_height"][i],
                            width=columns["crop_width"][i], flip=columns["flip"][i])
        yield render_view(img, params, src.size)


def cache_file_rows(
    fs, path: str, *, view: int | None = None, start_row: int = 0, source: int = 0, block: int = 64,
    rebuild: ViewSource | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One cache part file -> training rows; ``view`` keeps only that stored view (None: all).
    ``row_pos`` counts the rows this read keeps; rows before ``start_row`` are not decoded.
    ``rebuild``: the cache stores no pixels; the views are rebuilt from that source shard."""
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=CACHE_COLUMNS + (VIEW_COLUMNS if rebuild else []))
    if view is not None:
        table = table.filter(pc.equal(table["view"], view))
    views = rebuilt_views(table.slice(start_row), rebuild) if rebuild else None
    for start in range(start_row, table.num_rows, block):
        chunk = table.slice(start, block)
        pixels = np.stack([next(views) for _ in range(chunk.num_rows)]) if views else None
        rows = cache_rows({c: chunk.column(c) for c in CACHE_COLUMNS}, pixels)
        rows["source_pos"] = np.full(chunk.num_rows, source, dtype=np.int64)
        rows["row_pos"] = np.arange(start, start + chunk.num_rows, dtype=np.int64)
        yield rows


def cache_rows(batch: Mapping[str, Any], pixels_BHW3: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Cache rows (Arrow columns, or Ray's numpy batch, of key, view, pixels, tokens, label) -> training rows.

    Tokens stay in the cache's codec, (B, S) uint8, until the worker restores them on its device.
    ``pixels_BHW3``: the rows' views, rebuilt (a cache without pixels); else the stored ones are decoded.
    """
    labels = _values(batch["label"])
    labels = np.asarray([NO_LABEL if x is None or (isinstance(x, float) and np.isnan(x)) else int(x) for x in labels])
    return {
        "image": decode_pixels(_values(batch["pixels"])) if pixels_BHW3 is None else pixels_BHW3,
        "tokens": byte_rows(batch["tokens"]),
        "label": labels.astype(np.int64),
        "sample_id": np.asarray([sample_id(str(k), int(v)) for k, v in zip(_values(batch["key"]),
                                                                            _values(batch["view"]))], np.int64),
    }


def _values(column) -> list:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)


class TeacherTargets:
    """Batch of rows -> (normalised images (B, 3, H, W), teacher tokens (B, 1+N, D) float32).

    ``teacher=None`` is cache mode: the tokens come with the rows, in the cache's ``codec``.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], teacher: Teacher | None = None,
                 codec: TokenCodec | None = None) -> None:
        if (teacher is None) == (codec is None):
            raise ValueError("TeacherTargets needs a teacher (online mode) or the cache's token codec, not both")
        self.mean, self.std, self.teacher, self.codec = mean, std, teacher, codec

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images_B3HW = to_model_input(batch["image"].to(device, non_blocking=True), self.mean, self.std)
        if self.teacher is None:
            if "tokens" not in batch:
                raise ValueError("cache mode got rows without a tokens column; is data.cache a teacher cache?")
            return images_B3HW, self.codec.decode(batch["tokens"].to(device, non_blocking=True))
        return images_B3HW, self.teacher.encode_tokens(images_B3HW)


# --------------------------------------------------------------------- evaluation images
def load_eval_set(
    input_cfg: InputConfig, s3: S3Options, size: int, max_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled eval images as centre views: uint8 (M, size, size, 3), labels (M,).

    Reads shards in order until ``max_images``; unlabelled or undecodable samples are skipped.
    """
    inputs = discover(input_cfg, s3)
    images, labels = [], []
    for shard in inputs.shards:
        for sample in iter_samples(inputs.fs, shard, input_cfg):
            if sample.label is None or sample.image is None:
                continue
            try:
                images.append(center_view(decode_image(sample.image), size))
            except ImageDecodeError:
                continue
            labels.append(sample.label)
            if len(images) >= max_images:
                break
        if len(images) >= max_images:
            break
    if not images:
        raise ValueError(
            f"eval.input {input_cfg.paths} holds no labelled images (.cls, class folders or label_column)"
        )
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)

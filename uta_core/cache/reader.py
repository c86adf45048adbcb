"""Reading a committed teacher cache: its part files -> training rows (``uta_core.data.rows``).

``CacheRows`` reads one part file of a rank's epoch (a ``CachePart``): the stored view of
the epoch (``data.cache_views``), its label and id, and the stored token bytes, which stay
in the cache's codec until the trainer restores them on its device. A cache stored without
pixels (``pixel_format: none``) rebuilds every view from its input shard (``ViewSource``),
bit for bit the pixels the teacher saw. Writing a cache: ``uta_core.cache.writer``.

Shape legend: B rows (views), T = 1+N tokens (CLS first), D embed dim, H/W pixels, S stored bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from uta_core.cache.codecs import TokenCodec
from uta_core.cache.format import byte_rows, decode_pixels
from uta_core.cache.verify import RERUN, DamagedCacheError, read_part
from uta_core.data.rows import BLOCK_ROWS, NO_LABEL, sample_id
from uta_core.data.shards import InputConfig, InputShard, iter_samples
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.data.views import ViewParams, decode_image, render_view

CACHE_COLUMNS = ["key", "view", "pixels", "tokens", "label"]
VIEW_COLUMNS = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]


@dataclass(frozen=True, kw_only=True)
class ViewSource:
    """Where the views of a cache without pixels (``pixel_format: none``) are rebuilt from."""

    shard: InputShard  # the input shard the cache job read (its manifest record's ``input_shard``)
    input: InputConfig  # how to read it (format, parquet columns)
    size: int  # the view resolution

    @classmethod
    def of(cls, record: dict, columns: dict, size: int) -> ViewSource:
        shard = InputShard(**record)
        return cls(shard=shard, input=InputConfig(paths=[shard.uri], format=shard.format, **columns), size=size)


@dataclass(frozen=True, kw_only=True)
class CachePart:
    """One part file of a cache, as a source of training rows, with what its manifest record says of
    it (``bytes``, ``sha256``: checked as it is read, ``uta_core.cache.verify``)."""

    path: str  # scheme-less, on the cache's filesystem
    rebuild: ViewSource | None = None  # a cache without pixels: where its views are rebuilt from
    shard: str = ""
    file: str = ""  # relative to the cache root, as the manifest lists it
    bytes: int | None = None
    sha256: str | None = None
    xxh3_128: str | None = None


@dataclass(frozen=True, kw_only=True)
class CacheRows:
    """Reads one ``CachePart`` of a rank's epoch; ``view`` keeps that stored view (None: all)."""

    uri: str  # the cache root (for its filesystem)
    s3: S3Options
    view: int | None

    def __call__(self, part: CachePart, start: int, source: int) -> Iterator[dict[str, np.ndarray]]:
        fs, _ = filesystem_for(self.uri, self.s3)
        yield from cache_file_rows(fs, part.path, view=self.view, start_row=start, source=source,
                                   rebuild=part.rebuild, s3=self.s3, expect=part, uri=self.uri)


def rebuilt_views(rows: pa.Table, src: ViewSource, s3: S3Options) -> Iterator[np.ndarray]:
    """The views of ``rows`` (in shard order, as a part file holds them) rebuilt from the source shard:
    crop, resize, flip of the recorded parameters, exactly the pixels the teacher saw."""
    fs, _ = filesystem_for(src.shard.uri, s3)
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
                    f"{src.shard.uri} holds no sample {wanted!r} (any more, or not in this order): this cache stores "
                    "no pixels and rebuilds its views from its input shards, which must stay unchanged; restore the "
                    "input or rebuild the cache with output.pixel_format=jpeg"
                )
            key, img = wanted, decode_image(sample.image)
        params = ViewParams(top=columns["crop_top"][i], left=columns["crop_left"][i], height=columns["crop_height"][i],
                            width=columns["crop_width"][i], flip=columns["flip"][i])
        yield render_view(img, params, src.size)


def cache_file_rows(
    fs, path: str, *, view: int | None = None, start_row: int = 0, source: int = 0, block: int = BLOCK_ROWS,
    rebuild: ViewSource | None = None, s3: S3Options | None = None, expect: CachePart | None = None,
    uri: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One cache part file -> training rows; ``view`` keeps only that stored view (None: all).
    ``row_pos`` counts the rows this read keeps; rows before ``start_row`` are not decoded.
    ``rebuild``: the cache stores no pixels; the views are rebuilt from that source shard.
    ``expect``: the part's manifest record; its bytes are checked (size, sha256) before parsing."""
    where = f"cache {uri or path}: shard {expect.shard}, part {expect.file}" if expect else f"cache part {path}"
    columns = CACHE_COLUMNS + (VIEW_COLUMNS if rebuild else [])
    try:
        if expect is not None and (expect.xxh3_128 or expect.sha256):
            data = read_part(fs, path, expect.bytes, where, xxh3_128=expect.xxh3_128, sha256=expect.sha256)
            table = pq.read_table(pa.BufferReader(data), columns=columns)
        else:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=columns)
    except (pa.ArrowInvalid, FileNotFoundError) as err:  # a part read without its record: name it and the fix
        raise DamagedCacheError(f"{where}: unreadable ({str(err).splitlines()[0]}); {RERUN}") from None
    if view is not None:
        table = table.filter(pc.equal(table["view"], view))
    views = rebuilt_views(table.slice(start_row), rebuild, s3 or S3Options()) if rebuild else None
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


def read_cache_rows(batch: pa.Table | Mapping[str, Any], codec: TokenCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of cache rows (pyarrow table, or Ray's numpy dict) -> (pixels uint8 (B, H, W, 3),
    tokens float32 (B, 1+N, D)). Normalise pixels with ``uta_core.data.views.to_model_input``."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        encoded, stored_BS = batch.column("pixels").to_pylist(), byte_rows(batch.column("tokens"))
    else:
        encoded, stored_BS = list(batch["pixels"]), byte_rows(batch["tokens"])
    if len(encoded) and not encoded[0]:
        raise ValueError("these cache rows hold no pixels (pixel_format none): read them with "
                         "uta_core.cache.reader.cache_file_rows, which rebuilds the views from the source shards")
    return torch.from_numpy(decode_pixels(encoded)), codec.decode(stored_BS)

"""Training rows: the columns every pre-training reader hands the trainer, and the online
reader (raw shards -> fresh seeded views).

Every reader of a rank's epoch (raw shards here, the cache's part files in
``uta_core.cache.reader``) yields blocks of these numpy columns, so the training loop does
not care where a row came from:

    image       uint8 (B, H, W, 3)  the view at the student's resolution
    tokens      uint8 (B, S)        cached tokens only: the teacher's tokens in the cache's codec
    label       int64               class index, -1 when the sample has none
    sample_id   int64               stable id of (key, view): audits which rows a rank saw
    source_pos  int64               which source of the rank's epoch list the row came from
    row_pos     int64               the row's place in that source (``uta_core.data.epochs``)

Online views come from ``uta_core.data.views``, seeded by (seed, epoch, key, view): fresh
every epoch, and in epoch 0 pixel-identical to the cache job's view v of the image.

Shape legend: B rows, H/W view pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from uta_core.data.samples import decoded_samples
from uta_core.data.shards import InputConfig, InputShard
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.data.views import ViewConfig, sample_views
from uta_core.seeding import stable_seed

NO_LABEL = -1
BLOCK_ROWS = 64  # rows a reader hands on at a time


def sample_id(key: str, view: int) -> int:
    """Stable 63-bit id of one (image key, view) row, equal in every teacher mode."""
    return stable_seed(key, view)


def rows_block(images: list[np.ndarray], labels: list[int | None], ids: list[int], rows: list[int], source: int,
               size: int) -> dict[str, np.ndarray]:
    """Lists of one block's rows -> its numpy columns (``source_pos`` is the same for the whole block)."""
    return {
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray([NO_LABEL if x is None else x for x in labels], dtype=np.int64),
        "sample_id": np.asarray(ids, dtype=np.int64),
        "source_pos": np.full(len(rows), source, dtype=np.int64),
        "row_pos": np.asarray(rows, dtype=np.int64),
    }


@dataclass(frozen=True, kw_only=True)
class OnlineRows:
    """Reads one raw shard of a rank's epoch: ``num_views`` fresh views of every image.

    Row ``ordinal * num_views + view`` of the shard is its ``row_pos``; rows before
    ``start`` are passed over without decoding their image (a resumed epoch).
    """

    input: InputConfig
    views: ViewConfig
    num_views: int
    s3: S3Options
    epoch: int

    def __call__(self, shard: InputShard, start: int, source: int) -> Iterator[dict[str, np.ndarray]]:
        fs, _ = filesystem_for(shard.uri, self.s3)
        images, labels, ids, rows = [], [], [], []
        first_sample, first_view = divmod(start, self.num_views)
        for ordinal, sample, img in decoded_samples(fs, shard, self.input, first=first_sample):
            first = first_view if ordinal == first_sample else 0
            for v, (_, pixels_HW3) in enumerate(sample_views(img, sample.key, self.num_views, self.views, self.epoch,
                                                             first), first):
                images.append(pixels_HW3)
                labels.append(sample.label)
                ids.append(sample_id(sample.key, v))
                rows.append(ordinal * self.num_views + v)
            if len(images) >= BLOCK_ROWS:
                yield rows_block(images, labels, ids, rows, source, self.views.size)
                images, labels, ids, rows = [], [], [], []
        if images:
            yield rows_block(images, labels, ids, rows, source, self.views.size)

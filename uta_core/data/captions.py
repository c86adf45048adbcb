"""Image-caption rows for contrastive training: decoded centre views + captions, and fresh crops.

``CaptionRows`` reads one shard of a rank's epoch (a sample's ordinal in the shard is its
``row_pos``); the worker cuts fresh crops from the centre views at every step (``augment``).

Shape legend: B rows, H/W decoded pixels, S view size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from uta_core.data.rows import BLOCK_ROWS, NO_LABEL, sample_id
from uta_core.data.samples import decoded_samples
from uta_core.data.shards import InputConfig, InputShard
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.data.views import ViewConfig, center_view, render_view, sample_view_params


@dataclass(frozen=True, kw_only=True)
class CaptionRows:
    """One captioned shard -> blocks of ``pixels`` uint8 (B, size, size, 3), ``caption``, ``label``
    (-1: none), ``sample_id``, ``source_pos``, ``row_pos``; samples without an image or a caption,
    or whose image does not decode, are skipped and counted."""

    input: InputConfig
    s3: S3Options
    size: int  # the centre view's side, cut from the decoded image

    def __call__(self, shard: InputShard, start: int, source: int) -> Iterator[dict[str, np.ndarray]]:
        fs, _ = filesystem_for(shard.uri, self.s3)
        block: list[tuple[int, np.ndarray, str, int | None, str]] = []
        for ordinal, sample, img in decoded_samples(fs, shard, self.input, need=("caption",), first=start):
            block.append((ordinal, center_view(img, self.size), sample.caption, sample.label, sample.key))
            if len(block) >= BLOCK_ROWS:
                yield self._block(block, source)
                block = []
        if block:
            yield self._block(block, source)

    def _block(self, block: list[tuple], source: int) -> dict[str, np.ndarray]:
        ordinals, pixels, captions, labels, keys = zip(*block)
        return {
            "pixels": np.stack(pixels),
            "caption": np.array(captions, dtype=object),
            "label": np.array([NO_LABEL if x is None else x for x in labels], dtype=np.int64),
            "sample_id": np.array([sample_id(k, 0) for k in keys], dtype=np.int64),
            "source_pos": np.full(len(block), source, dtype=np.int64),
            "row_pos": np.array(ordinals, dtype=np.int64),
        }


def augment(pixels_BHW3: np.ndarray, views: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """A fresh RandomResizedCrop (+ flip) of every decoded image, as the cache job draws views.

    uint8 (B, H, W, 3) at ``data.decode_size`` -> uint8 (B, S, S, 3) at ``views.size``.
    """
    out = []
    for pixels_HW3 in pixels_BHW3:
        img = Image.fromarray(pixels_HW3)
        out.append(render_view(img, sample_view_params(img.width, img.height, views, rng), views.size))
    return np.stack(out)

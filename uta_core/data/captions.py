"""Image-caption rows for contrastive training: decoded centre views + captions, and fresh crops.

Shape legend: M rows of one shard, B batch, H/W decoded pixels, S view size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from uta_core.data.rows import NO_LABEL, sample_id
from uta_core.data.shards import InputConfig, InputShard, ShardReadError, discover, iter_samples
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.data.views import ImageDecodeError, ViewConfig, center_view, decode_image, render_view, sample_view_params


def caption_rows(shard: InputShard, input_cfg: InputConfig, s3: S3Options, size: int) -> dict[str, np.ndarray]:
    """One shard's captioned samples: centre views uint8 (M, size, size, 3), caption, label (-1: none),
    sample_id (as pre-training's rows).

    Samples without an image or a caption, or whose image does not decode, are skipped.
    """
    fs, _ = filesystem_for(shard.uri, s3)
    pixels, captions, labels, ids = [], [], [], []
    try:
        for sample in iter_samples(fs, shard, input_cfg):
            if sample.image is None or not sample.caption:
                continue
            try:
                img = decode_image(sample.image)
            except ImageDecodeError:
                continue
            pixels.append(center_view(img, size))
            captions.append(sample.caption)
            labels.append(NO_LABEL if sample.label is None else sample.label)
            ids.append(sample_id(sample.key, 0))
    except ShardReadError:
        pass  # keep what was read before the container broke
    return {
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "sample_id": np.array(ids, dtype=np.int64),
    }


def load_caption_set(
    input_cfg: InputConfig, s3: S3Options, size: int, max_images: int
) -> tuple[torch.Tensor, list[str]]:
    """Captioned eval images as centre views, uint8 (M, size, size, 3), and their captions (retrieval)."""
    pixels, captions = [], []
    for shard in discover(input_cfg, s3).shards:
        rows = caption_rows(shard, input_cfg, s3, size)
        take = max_images - sum(len(c) for c in captions)
        pixels.append(rows["pixels"][:take])
        captions.append(list(rows["caption"][:take]))
        if take <= len(rows["caption"]):
            break
    texts = [c for chunk in captions for c in chunk]
    if not texts:
        raise ValueError(f"retrieval input {input_cfg.paths} holds no captioned images (.txt or caption_column)")
    return torch.from_numpy(np.concatenate(pixels)), texts


def augment(pixels_BHW3: np.ndarray, views: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """A fresh RandomResizedCrop (+ flip) of every decoded image, as the cache job draws views.

    uint8 (B, H, W, 3) at ``data.decode_size`` -> uint8 (B, S, S, 3) at ``views.size``.
    """
    out = []
    for pixels_HW3 in pixels_BHW3:
        img = Image.fromarray(pixels_HW3)
        out.append(render_view(img, sample_view_params(img.width, img.height, views, rng), views.size))
    return np.stack(out)

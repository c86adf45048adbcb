"""Evaluation images: labelled centre views (zero-shot classification) and captioned centre
views (retrieval), read in shard order up to a cap.

Shape legend: M images, S view size.
"""

from __future__ import annotations

import numpy as np
import torch

from uta_core.data.samples import decoded_samples
from uta_core.data.shards import InputConfig, discover
from uta_core.data.storage import S3Options
from uta_core.data.views import center_view


def _centre_views(input_cfg: InputConfig, s3: S3Options, size: int, max_images: int, need: str):
    inputs = discover(input_cfg, s3)
    pixels, values = [], []
    for shard in inputs.shards:
        for _, sample, img in decoded_samples(inputs.fs, shard, input_cfg, need=(need,)):
            pixels.append(center_view(img, size))
            values.append(getattr(sample, need))
            if len(pixels) >= max_images:
                return pixels, values
    return pixels, values


def load_eval_set(
    input_cfg: InputConfig, s3: S3Options, size: int, max_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled eval images: uint8 (M, S, S, 3) centre views and labels (M,); unlabelled or
    undecodable samples are skipped."""
    pixels, labels = _centre_views(input_cfg, s3, size, max_images, "label")
    if not pixels:
        raise ValueError(f"eval input {input_cfg.paths} holds no labelled images (.cls, class folders or label_column)")
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.long)


def load_caption_set(
    input_cfg: InputConfig, s3: S3Options, size: int, max_images: int
) -> tuple[torch.Tensor, list[str]]:
    """Captioned eval images: uint8 (M, S, S, 3) centre views and their captions (retrieval)."""
    pixels, captions = _centre_views(input_cfg, s3, size, max_images, "caption")
    if not pixels:
        raise ValueError(f"retrieval input {input_cfg.paths} holds no captioned images (.txt or caption_column)")
    return torch.from_numpy(np.stack(pixels)), [str(c) for c in captions]

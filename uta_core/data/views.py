"""Image decoding and augmented views with recorded parameters.

A view is fully described by ``ViewParams`` (crop box in source pixels + flip), drawn
from a seed derived from (base seed, image key, view index, epoch). So a rerun of the cache
job produces the same views, a stored view can be rebuilt from the source image, and
online pre-training draws fresh views every epoch (epoch 0's are the cache job's views).

Shape legend: B batch, H/W view height/width (pixels), 3 RGB channels.
"""

from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from uta_core.seeding import stable_seed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")  # e.g. <_io.BytesIO object at 0x7f...>


class ImageDecodeError(ValueError):
    """Raised for bytes that are not a decodable image (corrupt, truncated, not an image)."""


@dataclass(kw_only=True)
class ViewConfig:
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")


@dataclass(frozen=True, kw_only=True)
class ViewParams:
    """Crop box (top, left, height, width) in source pixels, then resize, then flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_dict(self) -> dict:
        return asdict(self)


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, fully loaded (so truncation is detected here, not later)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except UnidentifiedImageError:  # its message names an in-memory buffer, not the sample
        raise ImageDecodeError("not an image format PIL can read (corrupt, empty, or not an image)") from None
    except Exception as err:  # PIL raises many types for bad data
        raise ImageDecodeError(f"cannot decode image: {_OBJECT_REPR.sub('', str(err)).strip()}") from None


def view_seed(base_seed: int, key: str, view_index: int, epoch: int = 0) -> int:
    """Stable 63-bit seed for one (key, view, epoch): independent of worker, order and process.
    Epoch 0 keeps the seeds caches were written with."""
    return stable_seed(base_seed, key, view_index) if epoch == 0 else stable_seed(base_seed, epoch, key, view_index)


def sample_view_params(
    width: int, height: int, cfg: ViewConfig, rng: np.random.Generator
) -> ViewParams:
    """RandomResizedCrop box (torchvision's algorithm) + flip, drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(cfg.scale[0], cfg.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return ViewParams(top=top, left=left, height=h, width=w, flip=_flip(cfg, rng))
    # Fallback as torchvision: central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return ViewParams(top=top, left=left, height=h, width=w, flip=_flip(cfg, rng))


def _flip(cfg: ViewConfig, rng: np.random.Generator) -> bool:
    return bool(cfg.hflip and rng.random() < 0.5)


def render_view(img: Image.Image, params: ViewParams, size: int) -> np.ndarray:
    """Apply a recorded view: crop, bicubic resize to size x size, flip -> uint8 (H, W, 3)."""
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    view = img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    if params.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view, dtype=np.uint8)


def center_view(img: Image.Image, size: int) -> np.ndarray:
    """Evaluation view: resize the short side to ``size`` (bicubic), then centre-crop ``size`` x ``size``
    -> uint8 (H, W, 3). It is torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)``, the eval
    transform of CLIP, open_clip and the official UTA zero-shot script (tests/test_official_text.py)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    view = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC), size)
    return np.asarray(view, dtype=np.uint8)


def sample_views(
    img: Image.Image, key: str, num_views: int, cfg: ViewConfig, epoch: int = 0, first: int = 0
) -> list[tuple[ViewParams, np.ndarray]]:
    """Views ``first..num_views-1`` of one image in ``epoch``, seeded: [(params, uint8 (H, W, 3))]."""
    views = []
    for v in range(first, num_views):
        rng = np.random.default_rng(view_seed(cfg.seed, key, v, epoch))
        params = sample_view_params(img.width, img.height, cfg, rng)
        views.append((params, render_view(img, params, cfg.size)))
    return views


def to_model_input(
    pixels_BHW3: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) with the teacher's mean/std."""
    x_B3HW = pixels_BHW3.permute(0, 3, 1, 2).float().div_(255.0)
    mean_13, std_13 = _channel_stats(tuple(mean), tuple(std), x_B3HW.device)
    return (x_B3HW - mean_13) / std_13


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    # Made once per device: a tensor built from a list copies from pageable memory, which
    # makes the host wait for the GPU's queue to drain (a hidden sync in every step).
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))

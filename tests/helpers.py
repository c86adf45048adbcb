"""Tiny random-init open_clip models for tests: built in milliseconds, no downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from uta_core.models.clip import tiny_clip_config as _library_tiny_config
from uta_core.models.teacher import Teacher
from uta_core.objectives.masking import MaskConfig, MaskGenerator

TINY_ARCH = "uta-test-tiny"


def tiny_clip_config(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, **vision: Any
) -> dict[str, Any]:
    """The library's tiny open_clip model config, with extra ``vision_cfg`` keys for refusal tests."""
    cfg = _library_tiny_config(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    cfg["vision_cfg"].update(vision)
    return cfg


def mask_gen(strategy: str, grid: tuple[int, int], mask_ratio: float, **options: Any) -> MaskGenerator:
    return MaskGenerator(MaskConfig(strategy=strategy, mask_ratio=mask_ratio, **options), grid)


def tiny_clip_model(seed: int = 0, **cfg: Any) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_clip_config(**cfg)).eval()


def tiny_clip_teacher(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, seed: int = 0
) -> Teacher:
    model = tiny_clip_model(seed, embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    return Teacher(model, arch=TINY_ARCH)


def write_model_config(directory: Path, name: str = TINY_ARCH, **cfg: Any) -> Path:
    """Write a tiny config as ``<directory>/<name>.json``; pass the path as a teacher arch.

    open_clip registers configs globally by name: give a config with other sizes its own name.
    """
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_config(**cfg)))
    return path

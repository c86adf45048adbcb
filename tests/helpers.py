"""Tiny random-init open_clip models for tests: built in milliseconds, no downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from uta_core.teacher import Teacher

TINY_ARCH = "uta-test-tiny"


def tiny_clip_config(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, **vision: Any
) -> dict[str, Any]:
    """An open_clip model config (the JSON schema of ``open_clip/model_configs``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size, "patch_size": patch_size,
            "width": 64, "layers": 2, "head_width": 16, **vision,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def tiny_clip_model(seed: int = 0, **cfg: Any) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_clip_config(**cfg)).eval()


def tiny_clip_teacher(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, seed: int = 0
) -> Teacher:
    model = tiny_clip_model(seed, embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    return Teacher.from_model(model, TINY_ARCH)


def write_model_config(directory: Path, name: str = TINY_ARCH, **cfg: Any) -> Path:
    """Write a tiny config as ``<directory>/<name>.json``; pass the path as a teacher arch.

    open_clip registers configs globally by name: give a config with other sizes its own name.
    """
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_config(**cfg)))
    return path

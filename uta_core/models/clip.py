"""Small open_clip CLIPs built from a typed config, saved in open_clip's own format.

A model saved here (``<name>.json`` model config + ``<name>.pt`` state dict) loads as a UTA
teacher with ``Teacher.from_open_clip(json_path, weights_path)``. The demo trains one because
no pretrained weights can be downloaded on an offline machine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn


def _default_vision() -> dict[str, Any]:
    return {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32}


def _default_text() -> dict[str, Any]:
    return {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}


@dataclass(kw_only=True)
class ClipModelConfig:
    """A small open_clip CLIP, in open_clip's model-config schema (``vision_cfg``/``text_cfg``)."""

    name: str = "uta-digits-clip"  # the saved config is <name>.json; open_clip registers it by name
    embed_dim: int = 128
    vision: dict[str, Any] = field(default_factory=_default_vision)
    text: dict[str, Any] = field(default_factory=_default_text)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name {self.name!r} must be a plain file stem (letters, digits, . _ -)")
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        for key in ("image_size", "patch_size"):
            if key not in self.vision:
                raise ValueError(f"vision.{key} must be set (the teacher grid depends on it)")
        if self.vision["image_size"] % self.vision["patch_size"]:
            raise ValueError(
                f"vision.image_size {self.vision['image_size']} is not a multiple of "
                f"vision.patch_size {self.vision['patch_size']}"
            )
        if self.vision.get("pool_type", "tok") != "tok" or self.vision.get("attentional_pool"):
            raise ValueError("vision.pool_type must stay 'tok' without attentional_pool: a UTA teacher needs a CLS")

    def open_clip_config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "vision_cfg": dict(self.vision), "text_cfg": dict(self.text)}


def build_clip(cfg: ClipModelConfig, seed: int = 0) -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` (same seed, same weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.CLIP(**cfg.open_clip_config())


def tokenizer_for(cfg: ClipModelConfig) -> open_clip.SimpleTokenizer:
    """The tokenizer ``Teacher`` uses for a custom config: open_clip's default BPE at the context length."""
    return open_clip.SimpleTokenizer(context_length=cfg.text.get("context_length", 77))


def save_clip(model: nn.Module, cfg: ClipModelConfig, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<name>.json`` + ``<name>.pt`` (a plain state dict) for ``Teacher.from_open_clip``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, weights_path = out_dir / f"{cfg.name}.json", out_dir / f"{cfg.name}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights_path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(weights_path)
    json_path.write_text(json.dumps(cfg.open_clip_config(), indent=2))
    return json_path, weights_path


def tiny_clip_config(embed_dim: int = 32, image_size: int = 32, patch_size: int = 4) -> dict[str, Any]:
    """The smallest useful open_clip model config (``--smoke-test`` runs and tests): an 8x8 grid."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": 64, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A model's input mean/std: open_clip's preprocess config, else OpenAI's (hand-built models carry none)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------- the temperature
STAGE2_TEMPERATURE = 0.01  # the paper's fixed temperature for stage 2
MAX_LOGIT_SCALE = 100.0  # open_clip clamps a learnable scale here (temperature >= 0.01)


def set_temperature(model: nn.Module, temperature: float, *, learnable: bool) -> None:
    """Set ``model.logit_scale`` to log(1/temperature); fixed mode freezes it for good."""
    if not 1.0 / MAX_LOGIT_SCALE <= temperature <= 1.0:
        raise ValueError(f"temperature must lie in [{1 / MAX_LOGIT_SCALE}, 1], got {temperature}")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / temperature))
    model.logit_scale.requires_grad_(learnable)


def clamp_logit_scale(model: nn.Module) -> None:
    """After an optimiser step, keep a learnable temperature >= 0.01 (open_clip's clamp)."""
    if model.logit_scale.requires_grad:
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def temperature_of(model: nn.Module) -> float:
    return float(1.0 / model.logit_scale.detach().exp())


class ClipForward(nn.Module):
    """``forward(images, ids) -> (image_BD, text_BD, logit_scale)`` of a CLIP, so DDP can wrap it.

    DDP only synchronises gradients when its own ``forward`` runs; calling ``encode_image``
    on the inner module would skip the all-reduce.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images_B3HW: torch.Tensor, ids_BL: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_image(images_B3HW), self.model.encode_text(ids_BL), self.model.logit_scale.exp()



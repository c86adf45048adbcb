"""CLIP-loss training pieces: the loss with soft targets, temperature modes, small CLIPs, stage 2.

Two uses (METHOD.md, ARCHITECTURE.md):
1. UTA stage 2: the pre-trained student becomes the image tower of a CLIP whose text tower
   is the teacher's; both are fine-tuned contrastively with the temperature fixed at 0.01.
2. A small CLIP trained from scratch, saved in open_clip's format (``<name>.json`` model
   config + weights), so ``Teacher.from_open_clip(json_path, weights_path)`` loads it as a
   UTA teacher. The demo needs this because no pretrained weights can be downloaded.

Both models are open_clip ``CLIP`` objects (stage 2 swaps ``visual`` for the student), so
one training step serves both: ``encode_image``, ``encode_text`` and ``logit_scale``.

Shape legend: B batch, D joint embed dim, L text context length, E student out dim (= D).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from uta_core.data import (
    ImageDecodeError,
    ViewConfig,
    center_view,
    decode_image,
    render_view,
    sample_view_params,
    to_model_input,
)
from uta_core.pretrain_config import ClusterConfig, RunSettings
from uta_core.shards import InputConfig, InputShard, ShardReadError, iter_samples
from uta_core.storage import S3Options, filesystem_for
from uta_core.student import UTAStudent
from uta_core.teacher import TeacherConfig
from uta_core.tracking import TrackingConfig
from uta_core.train import OptimConfig, TrainConfig
from uta_core.zeroshot import classify, topk_accuracy

STAGE2_TEMPERATURE = 0.01  # the paper's fixed temperature for stage 2
MAX_LOGIT_SCALE = 100.0  # open_clip clamps a learnable scale here (temperature >= 0.01)
_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|resblocks)\.(\d+)\.")


# --------------------------------------------------------------------- loss
def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """A stable 63-bit id per caption (equal captions, equal ids, in every process): (B,)."""
    ids = [int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "little") >> 1 for c in captions]
    return torch.tensor(ids, dtype=torch.long)


def soft_targets(group_B: torch.Tensor) -> torch.Tensor:
    """Target distribution per row (B, B): uniform over the samples of the same group."""
    same_BB = (group_B[:, None] == group_B[None, :]).float()
    return same_BB / same_BB.sum(dim=1, keepdim=True)


def clip_loss(
    image_BD: torch.Tensor,
    text_BD: torch.Tensor,
    logit_scale: torch.Tensor | float,
    group_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; ``logit_scale`` is 1/temperature (already exponentiated).

    Without ``group_B`` the positive of image i is text i only. With it, samples sharing a
    group (e.g. the same caption) are positives for each other: a repeated caption is not a
    negative of itself, which would otherwise push same-class images apart.
    """
    img_BD = F.normalize(image_BD.float(), dim=-1)
    txt_BD = F.normalize(text_BD.float(), dim=-1)
    logits_BB = logit_scale * img_BD @ txt_BD.T  # rows: images, columns: texts
    if group_B is None:
        labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
        return 0.5 * (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B))
    target_BB = soft_targets(group_B.to(logits_BB.device))  # symmetric relation: same for both ways
    loss_i = -(target_BB * logits_BB.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(target_BB * logits_BB.T.log_softmax(dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


# --------------------------------------------------------------------- temperature
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


# --------------------------------------------------------------------- small CLIPs
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


# --------------------------------------------------------------------- stage 2
class StudentTower(nn.Module):
    """A UTA student as an open_clip image tower: the CLS token after the head, (B, 3, H, W) -> (B, E)."""

    def __init__(self, student: UTAStudent):
        super().__init__()
        self.student = student

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return self.student(images_B3HW)[:, 0]

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)


def build_stage2_model(
    student: UTAStudent,
    clip_model: nn.Module,
    *,
    temperature: float = STAGE2_TEMPERATURE,
    learnable_temperature: bool = False,
) -> nn.Module:
    """Student image tower + a copy of ``clip_model``'s text tower (e.g. ``teacher.model``).

    The result is an open_clip ``CLIP`` whose ``visual`` is the student; the teacher's image
    tower is dropped and the teacher itself is left untouched (frozen).
    """
    if student.out_dim != clip_model.text_projection.shape[-1]:
        raise ValueError(
            f"student head maps to {student.out_dim} dims but the text tower embeds into "
            f"{clip_model.text_projection.shape[-1]}: pre-train the student with out_dim = the teacher's embed_dim"
        )
    visual = clip_model.visual
    clip_model.visual = None  # do not deep-copy the teacher's image tower
    try:
        model = copy.deepcopy(clip_model)
    finally:
        clip_model.visual = visual
    model.visual = StudentTower(student)
    if getattr(model, "logit_bias", None) is not None:
        model.logit_bias.requires_grad_(False)  # SigLIP-only; unused by the CLIP loss
    model.requires_grad_(True)
    student.mask_token.requires_grad_(False)  # MIM-only; DDP refuses parameters without gradients
    model.train()
    set_temperature(model, temperature, learnable=learnable_temperature)
    return model


# --------------------------------------------------------------------- optimiser groups
def image_layer_id(name: str, num_layers: int) -> int:
    """Depth of an image-tower parameter: embeddings 0, block i -> i + 1, norm/head -> L + 1."""
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(k in name for k in ("patch_embed", "cls_token", "pos_embed", "conv1", "class_embedding",
                               "positional_embedding", "ln_pre", "mask_token")):
        return 0
    return num_layers + 1


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D params / embeddings; optional layer-wise lr decay on ``visual``.

    Layer decay scales the lr of image-tower layer i by ``layer_decay ** (L + 1 - i)``; the
    text tower and the logit scale keep the base lr. Frozen params (a fixed temperature) are left out.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = _num_image_layers(model.visual)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if param.ndim < 2 or name in no_wd or name.endswith(".bias") else weight_decay
        scale = 1.0
        if layer_decay is not None and name.startswith("visual."):
            scale = layer_decay ** (num_layers + 1 - image_layer_id(name, num_layers))
        groups.setdefault((wd, scale), []).append(param)
    return [
        {"params": params, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
        for (wd, scale), params in sorted(groups.items())
    ]


def _num_image_layers(visual: nn.Module) -> int:
    ids = {int(m.group(1)) for n, _ in visual.named_parameters() if (m := _LAYER_RE.search("." + n))}
    return max(ids) + 1 if ids else 0


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


# --------------------------------------------------------------------- data
def caption_rows(shard: InputShard, input_cfg: InputConfig, s3: S3Options, size: int) -> dict[str, np.ndarray]:
    """One shard's captioned samples: centre views uint8 (M, size, size, 3), caption, label (-1: none).

    Samples without an image or a caption, or whose image does not decode, are skipped.
    """
    fs, _ = filesystem_for(shard.uri, s3)
    pixels, captions, labels = [], [], []
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
            labels.append(-1 if sample.label is None else sample.label)
    except ShardReadError:
        pass  # keep what was read before the container broke
    return {
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "caption": np.array(captions, dtype=object),
        "label": np.array(labels, dtype=np.int64),
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


# --------------------------------------------------------------------- job config
INITS = ("scratch", "uta_student")


@dataclass(kw_only=True)
class ContrastiveModelConfig:
    init: str = "scratch"  # scratch: a new small CLIP (clip); uta_student: stage 2 from a UTA export
    clip: ClipModelConfig = field(default_factory=ClipModelConfig)
    student: str | None = None  # uta_student: the export folder pipelines/pretrain.py wrote
    teacher: TeacherConfig | None = None  # uta_student: the teacher whose text tower is fine-tuned
    layer_decay: float | None = None  # lr x decay^(depth from the top) in the image tower; null = off

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} must be one of {', '.join(INITS)}")
        if self.init == "uta_student" and (not self.student or self.teacher is None):
            raise ValueError("init=uta_student needs model.student (a UTA export folder) and model.teacher")
        if self.init == "scratch" and (self.student or self.teacher is not None):
            raise ValueError("init=scratch trains model.clip from scratch: unset model.student and model.teacher")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay={self.layer_decay} must lie in (0, 1] (or null for none)")


@dataclass(kw_only=True)
class ContrastiveLossConfig:
    temperature: float = 0.07  # the start value (learnable) or the value for good (fixed)
    learnable_temperature: bool = True  # UTA stage 2: false at 0.01
    soft_targets: bool = True  # samples with equal captions are positives for each other

    def __post_init__(self) -> None:
        if not 1.0 / MAX_LOGIT_SCALE <= self.temperature <= 1.0:
            raise ValueError(f"temperature={self.temperature} must lie in [{1 / MAX_LOGIT_SCALE}, 1]")


@dataclass(kw_only=True)
class ContrastiveDataConfig:
    input: InputConfig  # image-caption shards (WebDataset key.txt, or a parquet caption column)
    views: ViewConfig = field(default_factory=lambda: ViewConfig(size=32, scale=(1.0, 1.0), hflip=False))
    # Images are decoded once per epoch to a centre square of this side, and the training
    # crops are cut from it: above views.size, crops keep more detail. None = views.size.
    decode_size: int | None = None
    shuffle_buffer: int = 1024  # rows mixed per worker (local shuffle); 0 keeps the shard order

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 turns shuffling off)")
        if self.decode_size is not None and self.decode_size < self.views.size:
            raise ValueError(f"decode_size={self.decode_size} must be >= views.size={self.views.size} (or null)")


@dataclass(kw_only=True)
class ContrastiveEvalConfig:
    """Zero-shot top-1 of the trained model, with its own text tower, on labelled held-out shards."""

    input: InputConfig | None = None  # None: no evaluation
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 10000
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.input is not None and not (self.classnames and self.templates):
            raise ValueError("eval.input needs eval.classnames and eval.templates (strings with '{}')")
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("eval.max_images and eval.batch_size must be >= 1")


@dataclass(kw_only=True)
class ContrastiveJobConfig:
    run: RunSettings = field(default_factory=lambda: RunSettings(name="contrastive-local"))
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(num_workers=1))
    data: ContrastiveDataConfig
    model: ContrastiveModelConfig = field(default_factory=ContrastiveModelConfig)
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=5e-5, grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(micro_batch=128, max_steps=150, warmup_steps=30))
    eval: ContrastiveEvalConfig = field(default_factory=ContrastiveEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.train.global_batch is not None:
            raise ValueError(
                "train.global_batch must be null: the contrastive loss needs every pair in one batch, "
                "so it cannot accumulate; set train.micro_batch (images per worker per step)"
            )
        if self.model.init == "scratch" and self.data.views.size != self.model.clip.vision["image_size"]:
            raise ValueError(
                f"data.views.size={self.data.views.size} must equal model.clip.vision.image_size="
                f"{self.model.clip.vision['image_size']} (the views are the image tower's input)"
            )


def clip_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std ``Teacher`` will use for this model (open_clip's preprocess config, else OpenAI's)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------- zero-shot evaluation
@torch.no_grad()
def zeroshot_top1(
    encode_image,
    classifier_DC: torch.Tensor,
    pixels_MHW3: torch.Tensor,
    labels_M: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
) -> float:
    """Top-1 of any ``encode_image`` (normalised (B, 3, H, W) -> (B, D)) against a classifier (D, C).

    For a teacher (``Teacher.encode_image``) or a stage-2 CLIP; students have ``student_eval``.
    """
    logits = []
    for start in range(0, len(pixels_MHW3), batch_size):
        x_B3HW = to_model_input(pixels_MHW3[start : start + batch_size], mean, std)
        logits.append(classify(encode_image(x_B3HW), classifier_DC))
    return topk_accuracy(torch.cat(logits), labels_M, ks=(1,))[1]

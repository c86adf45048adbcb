"""Frozen open_clip teacher: every final-layer token projected into the joint image-text space.

open_clip's ``output_tokens=True`` returns the patch tokens *before* the image projection;
UTA aligns the student with projected tokens (docs/METHOD.md), so this module applies the
tower's final norm and projection to every token itself, and checks once, at
construction, that the projected CLS token equals open_clip's own ``encode_image``.

Weights come from an open_clip hub tag, a local file, or ``s3://bucket/key`` (downloaded
once into a local cache). ``arch`` is a registered open_clip name, a path to an open_clip
model-config JSON file (registered under the file's stem), or an open_clip
``hf-hub:``/``local-dir:`` source (which carries its own weights).

Shape legend: B batch, N patches (H*W grid), W tower width, D joint embed dim, T texts.
Token sequences hold CLS at index 0: (B, 1+N, D).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Literal, get_args

import open_clip
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers import Mlp
from torch import nn

from uta_core.data.storage import S3Options
from uta_core.models.clip import mean_std
from uta_core.models.teacher_weights import (
    carries_own_weights,
    check_weights_chosen,
    resolve_arch,
    resolve_pretrained,
)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = get_args(Precision)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class TeacherConfig:
    arch: str = "ViT-B-16"  # open_clip name, model-config JSON path, or hf-hub:/local-dir:
    pretrained: str | None = None  # hub tag, local weights file, s3://bucket/key; None = random
    image_size: int | None = None  # run the teacher at this resolution (match the student grid)
    precision: Precision = "fp32"  # autocast dtype on CUDA; CPU always runs fp32

    def __post_init__(self) -> None:
        if not self.arch:
            raise ValueError("arch must name an open_clip model (e.g. ViT-B-16) or a model-config JSON path")
        if self.pretrained == "":
            raise ValueError("pretrained must be a hub tag, a weights path, an s3:// URI, or null")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")


class Teacher(nn.Module):
    """A frozen open_clip CLIP; always in eval mode, never requires grad."""

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        pretrained: str | None = None,
        precision: str = "fp32",
        tokenizer=None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        self.precision = precision
        _check_token_projection(model.visual, arch)
        self.image_size, self.patch_size, self.grid = _geometry(model.visual, arch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mean, self.std = mean_std(model)
        self.tokenizer = tokenizer or _tokenizer_for(model, arch)
        self.requires_grad_(False)
        self.eval()
        self._fingerprint: str | None = None
        self.embed_dim = self._verify_cls_token()

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_open_clip(
        cls,
        arch: str,
        pretrained: str | None = None,
        *,
        image_size: int | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        s3: S3Options | None = None,
    ) -> Teacher:
        """Build with ``open_clip.create_model``; ``image_size`` resamples the pos-embed."""
        name = resolve_arch(arch)
        weights = resolve_pretrained(name, pretrained, s3=s3)
        model = open_clip.create_model(
            name, pretrained=weights, force_image_size=image_size, device=device
        )
        tokenizer = _tokenizer_for(model, name)  # a JSON-path arch is registered under `name`
        return cls(model, arch=arch, pretrained=pretrained, precision=precision, tokenizer=tokenizer)

    # ----------------------------------------------------------------- module state
    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode: dropout / patch dropout must never run."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    # ----------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_tokens(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Final-layer tokens after the final norm and the image projection: (B, 1+N, D)."""
        images_B3HW = images_B3HW.to(self.device, non_blocking=True)
        with self._autocast():
            return _projected_tokens(self.model.visual, images_B3HW).float()

    @torch.no_grad()
    def encode_image(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """open_clip's own (unnormalised) image embedding, the reference for the CLS token: (B, D)."""
        images_B3HW = images_B3HW.to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model.encode_image(images_B3HW)
        out_BD = out[0] if isinstance(out, tuple) else out  # towers built with output_tokens=True
        return out_BD.float()

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings: list of T strings -> (T, D)."""
        if not texts:
            raise ValueError("encode_text needs at least one text")
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids_TL = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            with self._autocast():
                out = self.model.encode_text(ids_TL)
            chunks.append((out[0] if isinstance(out, tuple) else out).float())
        return torch.cat(chunks)

    def check_grid(self, student_grid: tuple[int, int], student_patch_size: int | None = None) -> None:
        check_grid(
            student_grid, self.grid,
            student_patch_size=student_patch_size, teacher_patch_size=self.patch_size,
        )

    def weights_fingerprint(self) -> str:
        """Short sha256 over the state dict (names, shapes, dtypes, bytes) as it runs."""
        if self._fingerprint is None:
            self._fingerprint = state_dict_fingerprint(self.model.state_dict())
        return self._fingerprint

    def _verify_cls_token(self) -> int:
        """Check that the projected CLS token is open_clip's image embedding; return D."""
        param = next(self.model.parameters())
        gen = torch.Generator().manual_seed(0)
        x_13HW = torch.randn(1, 3, self.image_size, self.image_size, generator=gen)
        x_13HW = x_13HW.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            ref_1D = self.model.encode_image(x_13HW)
            ref_1D = ref_1D[0] if isinstance(ref_1D, tuple) else ref_1D
            cls_1D = _projected_tokens(self.model.visual, x_13HW)[:, 0]
        scale = ref_1D.abs().max().item()
        if cls_1D.shape != ref_1D.shape or not torch.allclose(cls_1D, ref_1D, rtol=1e-3, atol=1e-3 * scale):
            raise NotImplementedError(
                f"{self.arch}: the projected CLS token differs from open_clip's encode_image, so "
                "per-token projection is not exact for this image tower; it cannot be a UTA teacher"
            )
        return ref_1D.shape[-1]


def build_teacher(
    cfg: TeacherConfig, *, random_seed: int | None, device: str | torch.device = "cpu", s3: S3Options | None = None
) -> Teacher:
    """The configured teacher; random-init weights only with a ``random_seed``, and then seeded,
    so every process (cache actors, training workers, the driver) builds the same ones."""
    check_weights_chosen(cfg.arch, cfg.pretrained, random_seed)
    quiet = _RandomOnPurpose() if random_seed is not None and cfg.pretrained is None else None
    if quiet:  # open_clip warns "No pretrained weights loaded": here that is what was asked for
        logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed or 0)
            teacher = Teacher.from_open_clip(cfg.arch, cfg.pretrained, image_size=cfg.image_size,
                                             precision=cfg.precision, device="cpu", s3=s3)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    return teacher.to(device)


class _RandomOnPurpose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


# --------------------------------------------------------------------- token paths
def _projected_tokens(visual: nn.Module, images_B3HW: torch.Tensor) -> torch.Tensor:
    if isinstance(visual, TimmModel):
        x_BTW = visual.trunk.forward_features(images_B3HW)  # final norm applied inside
        return visual.head(visual.trunk.head(x_BTW))  # token-wise heads only (checked)
    x_BTW = visual._embeds(images_B3HW)  # conv1, CLS, pos-embed, patch dropout (off in eval), ln_pre
    x_BTW = visual.transformer(x_BTW)
    return visual.ln_post(x_BTW) @ visual.proj  # (B, 1+N, W) -> (B, 1+N, D)


def _check_token_projection(visual: nn.Module, arch: str) -> None:
    """Refuse towers whose image embedding is not a token-wise map of the CLS token."""
    if isinstance(visual, VisionTransformer):
        _check_native(visual, arch)
    elif isinstance(visual, TimmModel):
        _check_timm(visual, arch)
    else:
        raise NotImplementedError(
            f"{arch}: image tower {type(visual).__name__} has no token sequence; "
            "use a ViT teacher (open_clip VisionTransformer or a timm ViT tower)"
        )


def _check_native(visual: VisionTransformer, arch: str) -> None:
    if visual.attn_pool is not None:
        raise NotImplementedError(
            f"{arch}: the image tower pools with attention (attentional_pool, as in CoCa); its "
            "tokens are not mapped into the joint space one by one, so per-token projection is undefined"
        )
    if visual.pool_type != "tok":
        raise NotImplementedError(
            f"{arch}: pool_type={visual.pool_type!r}; the image embedding is not the CLS token "
            "(e.g. CLIPA averages patches), so the teacher's CLS target is undefined; "
            "use a pool_type='tok' model"
        )
    if visual.proj is None:
        raise NotImplementedError(f"{arch}: the image tower has no projection (visual.proj is None)")


def _check_timm(visual: TimmModel, arch: str) -> None:
    trunk = visual.trunk
    problems = []
    if not hasattr(trunk, "forward_features") or not hasattr(trunk, "head"):
        problems.append(f"{type(trunk).__name__} lacks forward_features/head")
    if getattr(trunk, "attn_pool", None) is not None:
        problems.append("attention pooling (attn_pool)")
    if getattr(trunk, "global_pool", None) != "token":
        problems.append(f"global_pool={getattr(trunk, 'global_pool', None)!r} (need 'token')")
    if getattr(trunk, "num_prefix_tokens", None) != 1:
        problems.append(f"num_prefix_tokens={getattr(trunk, 'num_prefix_tokens', None)} (need CLS only)")
    if not isinstance(getattr(trunk, "fc_norm", nn.Identity()), nn.Identity):
        problems.append("a norm after pooling (fc_norm)")
    if not all(isinstance(m, (nn.Linear, nn.Dropout, Mlp)) for m in visual.head):
        problems.append("a pooling layer in the open_clip head (timm_pool abs_attn/rot_attn)")
    if problems:
        raise NotImplementedError(
            f"{arch}: timm image tower {type(trunk).__name__} cannot give exact per-token "
            f"projected features: {'; '.join(problems)}"
        )


def _geometry(visual: nn.Module, arch: str) -> tuple[int, int, tuple[int, int]]:
    """(image_size, patch_size, grid) of a square tower."""
    if isinstance(visual, TimmModel):
        embed = visual.trunk.patch_embed
        size, patch, grid = visual.image_size, embed.patch_size, embed.grid_size
    else:
        size, patch, grid = visual.image_size, visual.patch_size, visual.grid_size
    size, patch, grid = tuple(size), tuple(patch), tuple(grid)
    if size[0] != size[1] or patch[0] != patch[1]:
        raise NotImplementedError(
            f"{arch}: only square images and patches are supported, got {size} / {patch}"
        )
    if size[0] != grid[0] * patch[0]:
        raise ImageSizeError(arch, size[0], patch[0])
    return size[0], patch[0], (grid[0], grid[1])


class ImageSizeError(ValueError):
    """The image size is not a whole number of patches; ``advice(key)`` names the setting to change."""

    def __init__(self, arch: str, size: int, patch: int, key: str = "teacher.image_size") -> None:
        self.arch, self.size, self.patch = arch, size, patch
        super().__init__(self.advice(key))

    def advice(self, key: str) -> str:
        lower = max(self.patch, self.size // self.patch * self.patch)
        return (f"{self.arch}: {key}={self.size} px is not a whole number of {self.patch} px patches; "
                f"set {key} to a multiple of {self.patch} (e.g. {lower} or {lower + self.patch})")


def _tokenizer_for(model: nn.Module, arch: str):
    """The registered arch's tokenizer, else open_clip's default one, at the model's context length."""
    context_length = open_clip.get_model_tokenize_cfg(model).get("context_length")
    if carries_own_weights(arch) or open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------- grid matching
def image_size_for_grid(grid: tuple[int, int], patch_size: int) -> int:
    """The square input size that gives ``grid`` with ``patch_size`` patches."""
    if grid[0] != grid[1]:
        raise ValueError(f"grid {grid[0]}x{grid[1]} is not square; the teacher runs on square images")
    return grid[0] * patch_size


def check_grid(
    student_grid: tuple[int, int],
    teacher_grid: tuple[int, int],
    *,
    student_patch_size: int | None = None,
    teacher_patch_size: int | None = None,
) -> None:
    """Refuse a silent grid mismatch; the message says which setting resolves it."""
    student_grid, teacher_grid = tuple(student_grid), tuple(teacher_grid)
    if student_grid == teacher_grid:
        return
    s, t = _describe_grid(student_grid, student_patch_size), _describe_grid(teacher_grid, teacher_patch_size)
    if teacher_patch_size is not None and student_grid[0] == student_grid[1]:
        size = image_size_for_grid(student_grid, teacher_patch_size)
        fix = (
            f"set teacher.image_size={size} so the /{teacher_patch_size} teacher gives "
            f"{student_grid[0]}x{student_grid[1]}"
        )
    else:
        fix = "set teacher.image_size to (student grid x teacher patch size)"
    raise ValueError(
        f"student grid {s} != teacher grid {t}: {fix}, or set the student's img_size/patch_size "
        "to the teacher's grid"
    )


def _describe_grid(grid: tuple[int, int], patch_size: int | None) -> str:
    text = f"{grid[0]}x{grid[1]}"
    if patch_size is not None and grid[0] == grid[1]:
        text += f" ({grid[0] * patch_size} px / patch {patch_size})"
    return text

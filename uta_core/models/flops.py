"""Analytic FLOPs of one training step for UTA, FD and MIM (matmul FLOPs = 2 x MACs).

The student's cost depends on how many tokens go through the blocks: UTA 1+K (kept
tokens + CLS), FD and MIM 1+N (MIM fills masked positions with [MASK]). A training
step is forward + backward, counted as 3x the forward. The frozen teacher runs forward
only on the full 1+N sequence and is reported separately (zero in cache mode).

Norms, softmax, activations and the RoPE rotation are elementwise and left out: they
are well under 1% of a ViT's FLOPs at these widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from uta_core.models.student import EVA02_COMMON, VARIANTS

OBJECTIVES = ("uta", "fd", "mim", "uta_mim")
TRAIN_FACTOR = 3  # backward ~ 2x forward


@dataclass(frozen=True, kw_only=True)
class ViTShape:
    embed_dim: int
    depth: int
    mlp_hidden: int
    mlp_matrices: int  # 2 for GELU MLP, 3 for SwiGLU (gate, up, down)
    patch_size: int
    num_patches: int
    out_dim: int  # projection head (student) / visual.proj (teacher); 0 for none


@dataclass(frozen=True, kw_only=True)
class StepFlops:
    objective: str
    tokens: int
    student_forward: int
    student_step: int
    teacher_forward: int

    @property
    def total(self) -> int:
        return self.student_step + self.teacher_forward


def vit_forward_flops(shape: ViTShape, num_tokens: int) -> int:
    """Forward FLOPs with ``num_tokens`` (incl. CLS) through the blocks and the head."""
    T, D, H = num_tokens, shape.embed_dim, shape.mlp_hidden
    patch_embed = 2 * shape.num_patches * 3 * shape.patch_size**2 * D  # all patches embedded
    attn = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D  # qkv, QK^T and AV, proj
    mlp = 2 * T * D * H * shape.mlp_matrices
    head = 2 * T * D * shape.out_dim
    return patch_embed + shape.depth * (attn + mlp) + head


def student_shape(variant: str, *, img_size: int = 224, patch_size: int = 14, out_dim: int = 512) -> ViTShape:
    spec = dict(EVA02_COMMON, **VARIANTS[variant])
    D = spec["embed_dim"]
    return ViTShape(
        embed_dim=D,
        depth=spec["depth"],
        mlp_hidden=int(D * spec["mlp_ratio"]),
        mlp_matrices=3,
        patch_size=patch_size,
        num_patches=(img_size // patch_size) ** 2,
        out_dim=out_dim,
    )


def teacher_shape(arch: str, *, image_size: int | None = None) -> ViTShape:
    """Shape of an open_clip ViT image tower from its model config (no weights needed)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"open_clip has no model config named {arch!r}")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision and vision["timm_model_name"]:
        raise ValueError(f"{arch!r} is a timm-backed tower: analytic FLOPs cover open_clip ViTs only")
    width, size, patch = vision["width"], image_size or vision["image_size"], vision["patch_size"]
    return ViTShape(
        embed_dim=width,
        depth=vision["layers"],
        mlp_hidden=int(width * vision.get("mlp_ratio", 4.0)),
        mlp_matrices=2,
        patch_size=patch,
        num_patches=(size // patch) ** 2,
        out_dim=cfg["embed_dim"],
    )


def step_flops(
    objective: str, student: ViTShape, mask_ratio: float, teacher: ViTShape | None = None
) -> StepFlops:
    """FLOPs of one training step per image; ``teacher=None`` means cached features."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is unknown; choose one of {OBJECTIVES}")
    N = student.num_patches
    kept = round(N * (1 - mask_ratio))
    tokens = 1 + (kept if objective == "uta" else N)
    forward = vit_forward_flops(student, tokens)
    teacher_fwd = vit_forward_flops(teacher, 1 + teacher.num_patches) if teacher else 0
    return StepFlops(
        objective=objective,
        tokens=tokens,
        student_forward=forward,
        student_step=TRAIN_FACTOR * forward,
        teacher_forward=teacher_fwd,
    )

"""EVA-02 / UTA ViT student (RoPE, SwiGLU, sub-LN) with a kept-token forward.

Built on timm's ``Eva``. ``base``, ``large`` and ``giant`` are the towers of the released UTA
models (github jihaonew/UTA, ``eva_vit_model/eva_vit.py``): separate q/k/v projections with q
and v biases, SwiGLU with a LayerNorm inside (sub-LN), pre-norm blocks, CLS pooling through a
final LayerNorm, and 2-D RoPE whose positions are placed on a 16 x 16 *reference* grid
(``pt_hw_seq_len=16, intp_freq=True``: position i of an n-wide grid sits at i * 16 / n) and
not on the model's own grid. ``tests/test_official_uta.py`` checks outputs against that code.
timm can only drop patches at random (``patch_drop_rate``);
UTA needs *given* keep indices, so ``forward_kept`` gathers both the tokens and the
rotary table at those indices. A wrong rotary gather is silent, hence the shuffle test.

Shape legend: B batch, N patches, K kept patches, D student width, E out (teacher) dim,
R rotary table width. Sequences hold CLS at index 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from timm.models.eva import Eva
from torch import nn

# EVA-02 sizes as timm's eva02_{tiny,small,base,large}_patch14_224 state them. The
# `nano` and `micro` variants are ours: small enough for CPU tests and demos.
VARIANTS: dict[str, dict[str, Any]] = {
    "nano": dict(embed_dim=128, depth=4, num_heads=4),
    "micro": dict(embed_dim=128, depth=6, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, qkv_fused=False, scale_mlp=True),
    # UTA-g (eva_giant_p14_336 in the official code): its mlp ratio gives 4096 hidden units.
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=2.909133333333333, qkv_fused=False,
                  scale_mlp=True),
}
Variant = Literal["nano", "micro", "tiny", "small", "base", "large", "giant"]  # the keys of VARIANTS
# EVA-02 and UTA place rotary positions on this reference grid whatever the model's grid.
ROPE_REFERENCE_GRID = 16
# The timm model each EVA-02 size is checked against (and that an export names for timm).
TIMM_NAMES = {v: f"eva02_{v}_patch14_224" for v in ("tiny", "small", "base", "large")}
EVA02_COMMON = dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True)


@dataclass(kw_only=True)
class StudentConfig:
    variant: Variant = "tiny"
    img_size: int = 224
    patch_size: int = 14
    out_dim: int = 512
    drop_path_rate: float = 0.0
    # Side of the grid RoPE positions are scaled to (EVA-02 / UTA: 16). Students exported
    # before this setting existed used their own grid side; their timm config.json says so.
    rope_ref_grid: int = ROPE_REFERENCE_GRID
    overrides: dict[str, Any] = field(default_factory=dict)  # extra timm Eva kwargs

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {sorted(VARIANTS)}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.out_dim <= 0:
            raise ValueError(f"out_dim must be positive (the teacher's embed dim), got {self.out_dim}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.rope_ref_grid < 1:
            raise ValueError(f"rope_ref_grid must be >= 1 (EVA-02 / UTA use 16), got {self.rope_ref_grid}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return (side, side)


def eva_kwargs(cfg: StudentConfig) -> dict[str, Any]:
    """timm ``Eva`` kwargs of the student's trunk (JSON-ready): what the student builds and what
    an export's ``config.json`` tells timm, from one place."""
    ref = cfg.rope_ref_grid
    return {
        **EVA02_COMMON, **VARIANTS[cfg.variant],
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "ref_feat_shape": [ref, ref],
        "num_classes": 0, "global_pool": "token", **cfg.overrides,
    }


class UTAStudent(nn.Module):
    """timm Eva trunk + one linear head from student width to the teacher's embed dim."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Eva(**eva_kwargs(cfg), drop_path_rate=cfg.drop_path_rate)
        self.head = nn.Linear(self.trunk.embed_dim, cfg.out_dim)
        # [MASK] token, used only by the MIM baseline objective.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.trunk.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.trunk.patch_embed.num_patches

    @property
    def embed_dim(self) -> int:
        return self.trunk.embed_dim

    @property
    def out_dim(self) -> int:
        return self.head.out_features

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (timm's contract)."""
        names = {f"trunk.{n}" for n in self.trunk.no_weight_decay()} | {"mask_token"}
        return names & {n for n, _ in self.named_parameters()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """All tokens: (B, 3, H, W) -> (B, 1+N, E)."""
        return self.head(self.trunk.forward_features(images_B3HW))

    def forward_kept(self, images_B3HW: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
        """CLS + the kept patch tokens only: (B, 3, H, W), (B, K) -> (B, 1+K, E)."""
        x_BND = self._embed_with_pos(self.trunk.patch_embed(images_B3HW))
        cls_B1D, patches_BND = x_BND[:, :1], x_BND[:, 1:]
        D = patches_BND.shape[-1]
        kept_BKD = patches_BND.gather(1, keep_idx_BK.unsqueeze(-1).expand(-1, -1, D))
        x_BKD = torch.cat([cls_B1D, kept_BKD], dim=1)  # (B, 1+K, D)
        rope_NR = self.trunk.rope.get_embed()  # (N, R): one row per grid position
        rope_B1KR = rope_NR[keep_idx_BK].unsqueeze(1)  # (B, K, R) -> (B, 1, K, R): heads broadcast
        return self.head(self._blocks(x_BKD, rope_B1KR))

    def forward_masked(self, images_B3HW: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        """MIM baseline: masked patches replaced by [MASK], full sequence -> (B, 1+N, E)."""
        patches_BND = self.trunk.patch_embed(images_B3HW)
        w_BN1 = mask_BN.unsqueeze(-1).type_as(patches_BND)
        patches_BND = patches_BND * (1 - w_BN1) + self.mask_token * w_BN1
        x_BND = self._embed_with_pos(patches_BND)
        return self.head(self._blocks(x_BND, self.trunk.rope.get_embed()))

    def _embed_with_pos(self, patches_BND: torch.Tensor) -> torch.Tensor:
        B = patches_BND.shape[0]
        cls_B1D = self.trunk.cls_token.expand(B, -1, -1)
        x_BND = torch.cat([cls_B1D, patches_BND], dim=1) + self.trunk.pos_embed  # (B, 1+N, D)
        return self.trunk.pos_drop(x_BND)

    def _blocks(self, x_BTD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x_BTD = self.trunk.norm_pre(x_BTD)
        for blk in self.trunk.blocks:
            if self.trunk.grad_checkpointing and self.training:
                x_BTD = torch.utils.checkpoint.checkpoint(blk, x_BTD, rope=rope, use_reentrant=False)
            else:
                x_BTD = blk(x_BTD, rope=rope)
        return self.trunk.norm(x_BTD)


def build_student(
    variant: str,
    *,
    img_size: int = 224,
    patch_size: int = 14,
    out_dim: int = 512,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> UTAStudent:
    """Named EVA-02 variant with a head to ``out_dim``; ``overrides`` go to timm's Eva."""
    return UTAStudent(
        StudentConfig(
            variant=variant,
            img_size=img_size,
            patch_size=patch_size,
            out_dim=out_dim,
            drop_path_rate=drop_path_rate,
            overrides=overrides,
        )
    )

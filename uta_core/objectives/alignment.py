"""Alignment objectives: UTA (kept tokens + CLS) and the FD / MIM baselines of the paper's Tab. 6.

The losses, the student forward each objective needs, and the per-step masks.

Shape legend: B batch, N patches, K kept patches, D embedding dim. Token tensors carry
CLS at index 0, so a full sequence is (B, 1+N, D) and a kept one (B, 1+K, D).
All losses are minus a mean cosine similarity: perfect alignment gives -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from uta_core.models.student import UTAStudent
from uta_core.objectives.masking import MaskGenerator, keep_to_mask
from uta_core.seeding import torch_generator

Objective = Literal["uta", "fd", "mim", "uta_mim"]
OBJECTIVES = get_args(Objective)
MASK_TOKEN_OBJECTIVES = ("mim", "uta_mim")  # the student sees [MASK] tokens


@dataclass(kw_only=True)
class ObjectiveConfig:
    # uta | fd (all tokens, no mask) | mim ([MASK] tokens, loss on masked) | uta_mim (the paper's
    # Tab. 6 combination: [MASK] tokens in, alignment on the unmasked tokens + prediction of the masked)
    name: Objective = "uta"
    cls_weight: float = 1.0  # weight of the CLS term; 1.0 counts CLS as one more token

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"name={self.name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.cls_weight < 0:
            raise ValueError(f"cls_weight={self.cls_weight} must be >= 0")


def gather_kept(tokens_BND: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
    """Select CLS + the kept patch tokens from a full sequence: (B, 1+N, D) -> (B, 1+K, D)."""
    B, _, D = tokens_BND.shape
    patch_idx_BK = keep_idx_BK + 1  # skip CLS
    cls_idx_B1 = torch.zeros(B, 1, dtype=keep_idx_BK.dtype, device=keep_idx_BK.device)
    idx_BK1 = torch.cat([cls_idx_B1, patch_idx_BK], dim=1)  # (B, 1+K)
    return tokens_BND.gather(1, idx_BK1.unsqueeze(-1).expand(-1, -1, D))


def token_cosine_loss(
    student_BTD: torch.Tensor,
    teacher_BTD: torch.Tensor,
    weight_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minus the weighted mean cosine over all tokens of the batch (flattened, as EVA-02)."""
    if student_BTD.shape != teacher_BTD.shape:
        raise ValueError(
            f"student tokens {tuple(student_BTD.shape)} and teacher tokens "
            f"{tuple(teacher_BTD.shape)} differ: the token grids or embedding dims do not match"
        )
    cos_BT = F.cosine_similarity(student_BTD.float(), teacher_BTD.float(), dim=-1, eps=1e-6)
    if weight_BT is None:
        return -cos_BT.mean()
    return -(cos_BT * weight_BT).sum() / weight_BT.sum()


def _cls_weights(B: int, T: int, cls_weight: float, device: torch.device) -> torch.Tensor:
    weight_BT = torch.ones(B, T, device=device)
    weight_BT[:, 0] = cls_weight
    return weight_BT


def uta_loss(
    student_kept_BKD: torch.Tensor, teacher_kept_BKD: torch.Tensor, cls_weight: float = 1.0
) -> torch.Tensor:
    """UTA: align the student's CLS + kept tokens with the teacher's tokens at those positions.

    ``cls_weight`` scales the CLS term; 1.0 counts CLS as one more token.
    """
    B, T, _ = student_kept_BKD.shape
    return token_cosine_loss(
        student_kept_BKD, teacher_kept_BKD, _cls_weights(B, T, cls_weight, student_kept_BKD.device)
    )


def fd_loss(student_BND: torch.Tensor, teacher_BND: torch.Tensor, cls_weight: float = 1.0) -> torch.Tensor:
    """Feature distillation: every token, no masking (the ratio-0 point of UTA)."""
    return uta_loss(student_BND, teacher_BND, cls_weight)


def mim_loss(student_BND: torch.Tensor, teacher_BND: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """MIM (EVA-02 style): full sequence with [MASK] tokens, loss on the masked patches only.

    ``mask_BN`` is True where the patch was replaced by the [MASK] token.
    """
    B, N = mask_BN.shape
    if student_BND.shape[1] != 1 + N:
        raise ValueError(f"mim_loss expects 1+N={1 + N} tokens, got {student_BND.shape[1]}")
    weight_BT = torch.cat([torch.zeros(B, 1, device=mask_BN.device), mask_BN.float()], dim=1)
    return token_cosine_loss(student_BND, teacher_BND, weight_BT)


def prepare_student(student: UTAStudent, objective: ObjectiveConfig) -> None:
    """Freeze the [MASK] token unless the objective uses it (DDP refuses unused parameters)."""
    student.mask_token.requires_grad_(objective.name in MASK_TOKEN_OBJECTIVES)


class StudentForward(nn.Module):
    """The objective's student forward as ``forward``, so DDP can wrap it.

    DDP only prepares gradient synchronisation when its own ``forward`` runs; calling
    ``student.forward_kept`` on the inner module would skip the all-reduce.
    """

    def __init__(self, student: UTAStudent, objective: ObjectiveConfig) -> None:
        super().__init__()
        self.student = student
        self.objective = objective.name

    def forward(self, images_B3HW: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
        if self.objective == "uta":
            return self.student.forward_kept(images_B3HW, keep_idx_BK)  # (B, 1+K, D)
        if self.objective == "fd":
            return self.student(images_B3HW)  # (B, 1+N, D)
        mask_BN = keep_to_mask(keep_idx_BK, self.student.num_patches)
        return self.student.forward_masked(images_B3HW, mask_BN)  # (B, 1+N, D)


def step_loss(
    forward: nn.Module,
    images_B3HW: torch.Tensor,
    teacher_BND: torch.Tensor,
    keep_idx_BK: torch.Tensor,
    objective: ObjectiveConfig,
) -> torch.Tensor:
    """Loss of one micro-batch; ``forward`` is a ``StudentForward`` (or DDP of one).

    ``teacher_BND`` (B, 1+N, D) are the teacher's projected tokens of the same views,
    from the online teacher or the cache: the loss does not know which.
    """
    pred_BTD = forward(images_B3HW, keep_idx_BK)
    if objective.name == "uta":
        return uta_loss(pred_BTD, gather_kept(teacher_BND, keep_idx_BK), objective.cls_weight)
    if objective.name in ("fd", "uta_mim"):  # uta_mim: every token of the [MASK]ed sequence
        return fd_loss(pred_BTD, teacher_BND, objective.cls_weight)
    N = teacher_BND.shape[1] - 1
    return mim_loss(pred_BTD, teacher_BND, keep_to_mask(keep_idx_BK, N))


def draw_keep(
    mask_generator: MaskGenerator, batch_size: int, *, seed: int, rank: int, step: int, micro: int = 0
) -> torch.Tensor:
    """Kept indices (B, K) for one micro-batch, reproducible per (seed, rank, step, micro)."""
    return mask_generator(batch_size, torch_generator("mask", seed, rank, step, micro))

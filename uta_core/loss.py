"""Alignment losses: UTA (kept tokens + CLS) and the FD / MIM baselines of the paper's Tab. 6.

Shape legend: B batch, N patches, K kept patches, D embedding dim. Token tensors carry
CLS at index 0, so a full sequence is (B, 1+N, D) and a kept one (B, 1+K, D).
All losses are minus a mean cosine similarity: perfect alignment gives -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def keep_to_mask(keep_idx_BK: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean (B, N) mask, True at masked (not kept) positions."""
    B = keep_idx_BK.shape[0]
    mask_BN = torch.ones(B, num_patches, dtype=torch.bool, device=keep_idx_BK.device)
    mask_BN.scatter_(1, keep_idx_BK, False)
    return mask_BN

"""The contrastive (CLIP) objective: InfoNCE with soft targets, and the temperature modes.

UTA's optional stage 2 fine-tunes the student with the teacher's text tower on image-text
pairs with the temperature fixed at 0.01 (docs/METHOD.md); the demo trains its small CLIP
teacher with a learnable temperature. Both use this loss.

Shape legend: B batch, D joint embed dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from uta_core.seeding import stable_seed


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """A stable 63-bit id per caption (equal captions, equal ids, in every process): (B,)."""
    return torch.tensor([stable_seed(c) for c in captions], dtype=torch.long)


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

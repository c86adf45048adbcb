"""UTA stage 2: the pre-trained student as the image tower of a CLIP with the teacher's text tower.

The result is an open_clip ``CLIP`` whose ``visual`` is the student, so the contrastive
training step serves it and a small CLIP alike (``encode_image``, ``encode_text``, ``logit_scale``).

Shape legend: B batch, E student out dim (= the joint dim D), L text context length.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from uta_core.models.clip import STAGE2_TEMPERATURE, set_temperature
from uta_core.models.student import UTAStudent


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

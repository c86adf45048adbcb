"""The Ray-free half of pre-training: optimiser, LR schedule, masks per step, the step loss.

``pipelines/pretrain.py`` only moves data and calls these, so the maths of a step is the
same in ``online`` and ``cache`` teacher mode and testable without Ray.

Shape legend: B batch, N patches, K kept patches, D teacher (joint) embed dim,
T tokens (1+N or 1+K, CLS first).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from uta_core.loss import fd_loss, gather_kept, keep_to_mask, mim_loss, uta_loss
from uta_core.masking import MaskGenerator
from uta_core.student import UTAStudent

OBJECTIVES = ("uta", "fd", "mim")
PRECISIONS = ("bf16", "fp32")


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = "uta"  # uta | fd (all tokens, no mask) | mim ([MASK] tokens, loss on masked)
    cls_weight: float = 1.0  # weight of the CLS term; 1.0 counts CLS as one more token

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"name={self.name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.cls_weight < 0:
            raise ValueError(f"cls_weight={self.cls_weight} must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW as EVA-02 pre-training (METHOD.md defaults)."""

    lr: float = 1.5e-3
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 3.0  # max global grad norm; 0 turns clipping off

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must lie in [0, lr={self.lr}]")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must each lie in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, length and warm-up of a run; ``*_steps`` (optimiser steps) win over epochs."""

    micro_batch: int = 32  # images per worker per forward
    global_batch: int | None = None  # per optimiser step; None = micro_batch x workers (no accumulation)
    epochs: float = 1.0
    warmup_epochs: float = 1.0
    max_steps: int | None = None  # total optimiser steps; the cosine spans exactly these
    warmup_steps: int | None = None
    precision: str = "bf16"  # autocast dtype on GPU; CPU always runs fp32
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch={self.micro_batch} must be >= 1")
        if self.global_batch is not None and self.global_batch < self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} must be >= micro_batch={self.micro_batch}")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be positive")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 (or null to use epochs)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (or null to use warmup_epochs)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step so that micro x world x accum == global batch."""
        if self.global_batch is None:
            return 1
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {world_size} workers = {per_step}; set it to a multiple of {per_step}"
            )
        return self.global_batch // per_step

    def resolve(self, steps_per_epoch: int) -> tuple[int, int]:
        """(total optimiser steps, warm-up steps) for ``steps_per_epoch`` steps an epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        total = self.max_steps if self.max_steps is not None else max(1, round(self.epochs * steps_per_epoch))
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_epochs * steps_per_epoch)
        return total, min(warmup, total - 1)


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR of optimiser step ``step`` (0-based): linear warm-up to ``base_lr``, cosine to ``min_lr``.

    Warm-up is (step + 1) / warmup_steps, so the first step already learns.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``lr_at``; every param group's initial lr must be ``cfg.lr``."""

    def factor(step: int) -> float:
        lr = lr_at(step, base_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
        return lr / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices, none for 1-D params, biases, norms, embeddings.

    Embeddings are what ``model.no_weight_decay()`` names (pos-embed, CLS, [MASK]).
    Frozen parameters are left out.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def prepare_student(student: UTAStudent, objective: ObjectiveConfig) -> None:
    """Freeze the [MASK] token unless the objective uses it (DDP refuses unused parameters)."""
    student.mask_token.requires_grad_(objective.name == "mim")


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
    if objective.name == "fd":
        return fd_loss(pred_BTD, teacher_BND, objective.cls_weight)
    N = teacher_BND.shape[1] - 1
    return mim_loss(pred_BTD, teacher_BND, keep_to_mask(keep_idx_BK, N))


def mask_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """Stable 63-bit seed of one micro-batch's masks: the same run draws the same masks."""
    digest = hashlib.sha256(f"mask/{seed}/{rank}/{step}/{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_keep(
    mask_generator: MaskGenerator, batch_size: int, *, seed: int, rank: int, step: int, micro: int = 0
) -> torch.Tensor:
    """Kept indices (B, K) for one micro-batch, reproducible per (seed, rank, step, micro)."""
    gen = torch.Generator().manual_seed(mask_seed(seed, rank, step, micro))
    return mask_generator(batch_size, gen)


MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images (B,3,H,W), teacher (B,1+N,D), keep (B,K)


def train_step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Iterable[MicroBatch],
    num_micro: int,
    objective: ObjectiveConfig,
    *,
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimiser step over ``num_micro`` accumulated micro-batches; returns loss and grad norm.

    Each micro-batch loss is divided by ``num_micro``, so with equal micro-batches the
    gradient is that of the mean loss over the whole step. Under DDP only the last
    backward all-reduces (``no_sync`` on the others).
    """
    optimizer.zero_grad(set_to_none=True)
    total, seen = 0.0, 0
    for i, (images_B3HW, teacher_BND, keep_idx_BK) in enumerate(micro_batches):
        last = i == num_micro - 1
        sync = forward.no_sync() if hasattr(forward, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with _autocast(images_B3HW.device, autocast_dtype):
                loss = step_loss(forward, images_B3HW, teacher_BND, keep_idx_BK, objective)
            (loss / num_micro).backward()
        total += loss.item()
        seen += 1
    if seen != num_micro:
        raise RuntimeError(f"train_step got {seen} micro-batches, expected {num_micro}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    return {"loss": total / num_micro, "grad_norm": float(grad_norm)}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)

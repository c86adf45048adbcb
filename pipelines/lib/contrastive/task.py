"""The contrastive task the training loop runs: CLIP loss on image-caption batches.

``model.init=scratch`` trains a small open_clip CLIP (the demo's teacher), exported as
``<name>.json`` + ``<name>.pt`` for ``Teacher.from_open_clip``; ``model.init=uta_student`` is
UTA's stage 2: the student export + the teacher's text tower (or a released UTA checkpoint with
its own text tower), exported as a student export + ``text.pt``, which is an open_clip CLIP too.
Each step draws fresh seeded crops per (seed, rank, step); with several workers the features
are all-gathered (with gradients), so the loss sees the global batch.

Shape legend: B batch, U distinct captions in it, D joint embed dim, L context length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.lib.contrastive.config import ContrastiveJobConfig
from uta_core.data.captions import augment
from uta_core.data.prefetch import pin
from uta_core.data.views import to_model_input
from uta_core.distributed import all_gather_with_grad
from uta_core.eval.data import load_eval_set
from uta_core.eval.evaluator import zeroshot_accuracy
from uta_core.eval.zeroshot import build_classifier
from uta_core.models.clip import (
    ClipForward,
    build_clip,
    clamp_logit_scale,
    mean_std,
    save_clip,
    set_temperature,
    tokenizer_for,
)
from uta_core.models.export import export_student
from uta_core.models.official_text import official_text_clip, official_text_config, official_tokenizer
from uta_core.models.open_clip_export import write_open_clip, write_open_clip_files
from uta_core.models.stage2 import build_stage2_model
from uta_core.models.teacher import Teacher, build_teacher
from uta_core.models.trained import load_trained_student
from uta_core.objectives.contrastive import caption_ids, clip_loss
from uta_core.seeding import rng


def build_model(cfg: ContrastiveJobConfig):
    """(CLIP-like model, tokenizer, mean, std) for ``model.init``."""
    if cfg.model.init == "scratch":
        model = build_clip(cfg.model.clip, seed=cfg.run.seed)
        set_temperature(model, cfg.loss.temperature, learnable=cfg.loss.learnable_temperature)
        return model.train(), tokenizer_for(cfg.model.clip), *mean_std(model)
    student, mean, std, info = load_trained_student(cfg.model.student, cfg.s3)  # local or s3://, onto the CPU
    student.train()
    if cfg.model.teacher is None:  # a released UTA checkpoint: its own text tower
        if not info.get("text_state"):
            raise ValueError(f"model.student={cfg.model.student} brings no text tower: set model.teacher (the "
                             "CLIP whose text tower is fine-tuned), or pass a released UTA checkpoint file")
        clip = official_text_clip(info["text_state"], info.get("logit_scale"))
        tokenizer = official_tokenizer(info["text_state"])
    else:
        teacher: Teacher = build_teacher(cfg.model.teacher, random_seed=None, s3=cfg.s3)
        if tuple(mean) != teacher.mean or tuple(std) != teacher.std:
            raise ValueError(
                f"the student export {cfg.model.student} was trained with mean/std {list(mean)}/{list(std)} "
                f"but model.teacher normalises with {teacher.mean}/{teacher.std}: use the student's teacher"
            )
        clip, tokenizer = teacher.model, teacher.tokenizer
    model = build_stage2_model(student, clip, temperature=cfg.loss.temperature,
                               learnable_temperature=cfg.loss.learnable_temperature)
    return model, tokenizer, tuple(mean), tuple(std)


class ContrastiveTask:
    tokens_per_image = None

    def __init__(self, cfg: ContrastiveJobConfig, device: torch.device, rank: int) -> None:
        self.cfg, self.device, self.rank = cfg, device, rank
        self.model, self.tokenizer, self.mean, self.std = build_model(cfg)
        self.forward: nn.Module = ClipForward(self.model)
        self._eval: tuple[torch.Tensor, torch.Tensor] | None = None  # read once, evaluated every time

    def prepare(self, batch: dict[str, np.ndarray], step: int, micro: int) -> dict[str, Any]:
        """This step's random crops (seeded per seed, rank, step), as pinned uint8 pixels."""
        crops = augment(batch["pixels"], self.cfg.data.views, rng("crops", self.cfg.data.views.seed, self.rank, step))
        return {**batch, "pixels": pin(torch.from_numpy(crops), self.device)}

    def loss(self, forward: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        # uint8 to the device (a quarter of float32's bytes), normalised there.
        images_B3HW = to_model_input(batch["pixels"].to(self.device, non_blocking=True), self.mean, self.std)
        captions = [str(c) for c in batch["caption"]]
        # Each distinct caption goes through the text tower once (digits: 10 per batch);
        # indexing copies the embedding, so the gradient is the same as encoding every row.
        unique, inverse_B = np.unique(np.array(captions, dtype=object), return_inverse=True)
        ids_UL = self.tokenizer([str(c) for c in unique]).to(self.device)
        image_BD, text_UD, scale = forward(images_B3HW, ids_UL)
        text_BD = text_UD[torch.from_numpy(inverse_B.reshape(-1)).to(self.device)]
        groups_B = all_gather_with_grad(caption_ids(captions).to(self.device)) if self.cfg.loss.soft_targets else None
        return clip_loss(all_gather_with_grad(image_BD), all_gather_with_grad(text_BD), scale, groups_B)  # fp32

    def after_step(self) -> dict[str, torch.Tensor]:
        clamp_logit_scale(self.model)
        return {"temperature": self.model.logit_scale.detach().neg().exp()}  # read when logged

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Zero-shot top-1/5 with the model's own text tower on ``eval.input``."""
        ev = self.cfg.eval
        if ev.input is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        encode_text = lambda texts: self.model.encode_text(self.tokenizer(texts).to(self.device))  # noqa: E731
        classifier_DC = build_classifier(encode_text, ev.classnames, ev.templates)  # the text tower trains
        if self._eval is None:
            self._eval = load_eval_set(ev.input, self.cfg.s3, self.cfg.data.views.size, ev.max_images)
        pixels, labels = self._eval
        metrics = zeroshot_accuracy(self.model.encode_image, pixels, labels, classifier_DC, self.mean, self.std,
                                    batch_size=ev.batch_size, device=self.device)
        self.model.train(was_training)
        return metrics

    def export(self, folder: Path, step: int) -> None:
        """The trained model, ready to use: an open_clip CLIP (scratch) or a student export + text tower."""
        if self.cfg.model.init == "scratch":
            save_clip(self.model, self.cfg.model.clip, folder)
            return
        export_student(self.model.visual.student, folder, mean=self.mean, std=self.std,
                       extra={"stage": "contrastive", "step": step, "run": self.cfg.run.name})
        text = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if not k.startswith("visual.")}
        torch.save(text, folder / "text.pt")
        teacher = self.cfg.model.teacher
        if teacher is None:  # the released checkpoint's own text tower, tuned
            write_open_clip_files(folder, text, official_text_config(text),
                                  {"text_tower": f"{self.cfg.model.student} (its own text.*, fine-tuned)"})
        else:
            write_open_clip(folder, self.model, teacher.arch, teacher.pretrained)

    def meta(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def on_run_start(self, log_artifact) -> None:
        pass

    def describe(self) -> str:
        return f"contrastive ({self.cfg.model.init})"

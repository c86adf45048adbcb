"""The pre-training task the Ray Train loop runs: a UTA (or FD / MIM) student against teacher tokens.

Per micro-batch, on the loop's prefetch thread (``prepare``): numpy rows -> pinned tensors
and the kept indices drawn per (seed, rank, step, micro). Per optimiser step (``step``):
teacher targets (online: the frozen teacher in this worker; cache: the stored tokens,
restored on the device) -> ``uta_core.optim.train_step`` under DDP. Rank 0 evaluates
zero-shot and exports the student in timm's layout.

Shape legend: B micro-batch, K kept patches, N patches, D teacher embed dim.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train.torch
import torch

from pipelines.lib.pretrain.config import PretrainConfig
from uta_core.cache.format import open_codec
from uta_core.data.captions import load_caption_set
from uta_core.data.prefetch import pin
from uta_core.data.rows import TeacherTargets, load_eval_set
from uta_core.eval.evaluator import (eval_caption_bank, load_classifier, prompts, retrieval_metrics,
                                    teacher_classifier, zeroshot_accuracy)
from uta_core.models.export import export_student
from uta_core.models.student import UTAStudent
from uta_core.models.open_clip_export import write_open_clip
from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher
from uta_core.objectives.alignment import StudentForward, draw_keep, prepare_student, step_loss
from uta_core.objectives.mask_maps import masking_probability, plot_masking_maps
from uta_core.objectives.masking import MaskGenerator
from uta_core.optim import build_optimizer, build_scheduler, compiled, train_step

log = logging.getLogger("uta.pretrain")


def check_teacher(teacher: Teacher, student: UTAStudent) -> None:
    teacher.check_grid(student.grid, student.cfg.patch_size)
    if teacher.embed_dim != student.out_dim:
        raise ValueError(
            f"student.out_dim={student.out_dim} but the teacher's joint embed dim is {teacher.embed_dim}; "
            f"set student.out_dim={teacher.embed_dim}"
        )


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Ray hands out read-only views of Arrow memory; torch wants writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class AlignmentTask:
    experiment = "uta-pretrain"
    artifact_name = "student"

    def __init__(self, cfg: PretrainConfig, plan, device: torch.device, rank: int) -> None:
        self.cfg, self.plan, self.device, self.rank = cfg, plan, device, rank
        self.student = self.model = UTAStudent(cfg.student)
        prepare_student(self.student, cfg.objective)
        self.student.set_grad_checkpointing(cfg.train.grad_checkpointing)
        self.student.to(device)
        self.optimizer = build_optimizer(self.student, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, warmup_steps=plan.warmup_steps,
                                         total_steps=plan.total_steps)
        self.teacher = None
        self.mean, self.std = tuple(plan.mean or ()), tuple(plan.std or ())
        if cfg.data.teacher_mode == "online":
            teacher_cfg = dataclasses.replace(cfg.teacher, image_size=cfg.student.img_size)
            self.teacher = build_teacher(teacher_cfg, random_seed=cfg.teacher_random_seed, device=device, s3=cfg.s3)
            check_teacher(self.teacher, self.student)
            self.mean, self.std = self.teacher.mean, self.teacher.std
        codec = open_codec(cfg.data.cache, cfg.s3) if self.teacher is None else None
        self.targets = TeacherTargets(self.mean, self.std, self.teacher, codec)
        self.forward = compiled(ray.train.torch.prepare_model(StudentForward(self.student, cfg.objective)),
                                cfg.train.compile)
        self.mask_gen = MaskGenerator(cfg.mask, self.student.grid)
        kept = self.mask_gen.num_keep if cfg.objective.name == "uta" else self.mask_gen.num_patches
        self.tokens_per_image = 1 + kept  # student tokens through the blocks
        self.images_per_step = cfg.train.micro_batch * plan.accumulation
        self.amp = torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else None
        self._eval: tuple | None = None  # pixels, labels, classifier, retrieval set (read once)

    def prepare(self, batch: dict[str, np.ndarray], step: int, micro: int) -> dict[str, Any]:
        """Pinned tensors and this micro-batch's masks (reproducible per seed, rank, step, micro)."""
        host = {k: pin(_tensor(v), self.device) for k, v in batch.items() if k in ("image", "tokens")}
        keep_BK = draw_keep(self.mask_gen, len(batch["image"]), seed=self.cfg.run.seed, rank=self.rank, step=step,
                            micro=micro)
        return {**batch, **host, "keep": pin(keep_BK, self.device)}

    def step(self, group: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        def micro_loss(batch: dict[str, Any]):
            def loss() -> torch.Tensor:
                images_B3HW, teacher_BND = self.targets(batch, self.device)
                keep_BK = batch["keep"].to(self.device, non_blocking=True)
                return step_loss(self.forward, images_B3HW, teacher_BND, keep_BK, self.cfg.objective)
            return loss

        return train_step(self.forward, self.optimizer, self.scheduler,
                          (micro_loss(b) for b in group), len(group),
                          grad_clip=self.cfg.optim.grad_clip, autocast_dtype=self.amp, device_type=self.device.type)

    def evaluate(self) -> dict[str, float]:
        ev = self.cfg.eval
        if not ev.enabled:
            return {}
        if self._eval is None:
            self._eval = self._load_eval()
        metrics: dict[str, float] = {}
        pixels, labels, classifier_DC, retrieval = self._eval
        if labels is not None:
            metrics |= zeroshot_accuracy(self.student, pixels, labels, classifier_DC, self.mean, self.std,
                                         batch_size=ev.batch_size, device=self.device)
        if retrieval is not None:
            cap_pixels, captions, bank = retrieval
            metrics |= retrieval_metrics(self.student, cap_pixels, captions, bank, self.mean, self.std,
                                         batch_size=ev.batch_size, device=self.device)
        return metrics

    def _load_eval(self):
        """Eval images, labels and text embeddings: read once, from the classifier file or the online teacher."""
        ev, size = self.cfg.eval, self.cfg.student.img_size
        classifier = load_classifier(ev.classifier_path, self.cfg.s3) if ev.classifier_path is not None else {}
        pixels = labels = classifier_DC = retrieval = None
        if ev.input is not None:
            pixels, labels = load_eval_set(ev.input, self.cfg.s3, size, ev.max_images)
            if "weights" in classifier:
                classifier_DC = classifier["weights"]
            else:  # online mode only (the config refuses cache mode without a file)
                names, templates = prompts(ev.prompts, ev.classnames, ev.templates)
                classifier_DC = teacher_classifier(self.teacher, names, templates)["weights"]
        if ev.retrieval_input is not None:
            cap_pixels, captions = load_caption_set(ev.retrieval_input, self.cfg.s3, size, ev.max_images)
            retrieval = (cap_pixels, captions, eval_caption_bank(classifier, self.teacher, captions))
        return pixels, labels, classifier_DC, retrieval

    def export(self, folder: Path, step: int) -> None:
        extra = {"run_name": self.cfg.run.name, "step": step, "teacher": self.plan.teacher,
                 "teacher_mode": self.cfg.data.teacher_mode}
        export_student(self.student, folder, mean=tuple(self.mean), std=tuple(self.std), extra=extra)
        teacher = self.teacher or self._text_teacher()
        if teacher is not None:
            write_open_clip(folder, teacher.model, teacher.arch, teacher.pretrained)

    def _text_teacher(self) -> Teacher | None:
        """The cache's teacher, rebuilt for its text tower (the open_clip CLIP of the export); None when
        its weights cannot be had here or differ from the cache's."""
        spec = self.plan.teacher or {}
        try:
            teacher = build_teacher(TeacherConfig(arch=spec["arch"], pretrained=spec.get("pretrained"),
                                                  image_size=spec.get("image_size")),
                                    random_seed=self.cfg.teacher_random_seed, s3=self.cfg.s3)
        except (ValueError, OSError, RuntimeError) as err:
            log.warning("the export has no open_clip CLIP: the cache's teacher could not be built (%s); "
                        "add it with `python pipelines/export.py`", err)
            return None
        if spec.get("fingerprint") not in (None, teacher.weights_fingerprint()):
            log.warning("the export has no open_clip CLIP: the teacher built from %s is not the cache's "
                        "(weights fingerprint differs); add it with `python pipelines/export.py`", spec["arch"])
            return None
        return teacher

    def on_run_start(self, log_artifact) -> None:
        prob_HW = masking_probability(self.mask_gen, num_samples=2000)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "masking_probability.png"
            plot_masking_maps({f"{self.cfg.mask.strategy} ({self.cfg.mask.mask_ratio})": prob_HW}, path)
            log_artifact(str(path))

    def describe(self) -> str:
        return f"{self.cfg.objective.name}, {self.cfg.data.teacher_mode} teacher"

    def run_tags(self) -> dict[str, str]:
        return {"uta.teacher_mode": self.cfg.data.teacher_mode}

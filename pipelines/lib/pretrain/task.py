"""The pre-training task: a UTA (or FD / MIM) student against its teacher's tokens.

Per micro-batch, on the loop's prefetch thread (``prepare``): numpy rows -> pinned tensors and
the kept indices drawn per (seed, rank, step, micro). Per micro-batch on the device (``loss``):
the teacher's tokens from the run's target source (``uta_core.targets``: the online teacher,
or stored tokens restored by the cache's codec) -> the objective's loss. Rank 0 evaluates
zero-shot and retrieval and exports the student (timm + open_clip folder).

Shape legend: B micro-batch, K kept patches, N patches, D teacher embed dim.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.lib.pretrain.config import PretrainConfig
from uta_core.data.prefetch import pin
from uta_core.eval.data import load_caption_set, load_eval_set
from uta_core.eval.evaluator import (
    eval_caption_bank,
    load_classifier,
    prompts,
    retrieval_metrics,
    teacher_classifier,
    zeroshot_accuracy,
)
from uta_core.models.export import export_student
from uta_core.models.open_clip_export import write_open_clip
from uta_core.models.student import UTAStudent
from uta_core.models.trained import start_weights
from uta_core.objectives.alignment import StudentForward, draw_keep, prepare_student, step_loss
from uta_core.objectives.mask_maps import masking_probability, plot_masking_maps
from uta_core.objectives.masking import MaskGenerator
from uta_core.targets.source import TargetSource


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Rows from Ray's object store are read-only views; torch wants writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class AlignmentTask:
    def __init__(self, cfg: PretrainConfig, source: TargetSource, teacher: dict[str, Any], device: torch.device,
                 rank: int) -> None:
        self.cfg, self.provenance, self.device, self.rank = cfg, teacher, device, rank
        self.student = self.model = UTAStudent(cfg.student)
        if cfg.init_from:  # a resumed run's checkpoint, loaded after this, wins
            self.student.load_state_dict(start_weights(cfg.init_from, cfg.student, cfg.s3))
        prepare_student(self.student, cfg.objective)
        self.targets = source.open(cfg.student, device)
        self.forward: nn.Module = StudentForward(self.student, cfg.objective)
        self.mask_gen = MaskGenerator(cfg.mask, self.student.grid)
        kept = self.mask_gen.num_keep if cfg.objective.name == "uta" else self.mask_gen.num_patches
        self.tokens_per_image = 1 + kept  # student tokens through the blocks
        self._eval: tuple | None = None  # pixels, labels, classifier, retrieval set (read once)

    def prepare(self, batch: dict[str, np.ndarray], step: int, micro: int) -> dict[str, Any]:
        """Pinned tensors and this micro-batch's masks (reproducible per seed, rank, step, micro)."""
        host = {k: pin(_tensor(v), self.device) for k, v in batch.items() if k in ("image", "tokens")}
        keep_BK = draw_keep(self.mask_gen, len(batch["image"]), seed=self.cfg.run.seed, rank=self.rank, step=step,
                            micro=micro)
        return {**batch, **host, "keep": pin(keep_BK, self.device)}

    def loss(self, forward: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images_B3HW, teacher_BND = self.targets(batch, self.device)
        keep_BK = batch["keep"].to(self.device, non_blocking=True)
        return step_loss(forward, images_B3HW, teacher_BND, keep_BK, self.cfg.objective)

    def after_step(self) -> dict[str, torch.Tensor]:
        return {}

    def evaluate(self) -> dict[str, float]:
        ev = self.cfg.eval
        if not ev.enabled:
            return {}
        if self._eval is None:
            self._eval = self._load_eval()
        metrics: dict[str, float] = {}
        pixels, labels, classifier_DC, retrieval = self._eval
        mean, std = self.targets.mean, self.targets.std
        if labels is not None:
            metrics |= zeroshot_accuracy(self.student, pixels, labels, classifier_DC, mean, std,
                                         batch_size=ev.batch_size, device=self.device)
        if retrieval is not None:
            cap_pixels, captions, bank = retrieval
            metrics |= retrieval_metrics(self.student, cap_pixels, captions, bank, mean, std,
                                         batch_size=ev.batch_size, device=self.device)
        return metrics

    def _load_eval(self):
        """Eval images, labels and text embeddings: read once, from the classifier file or the worker's teacher."""
        ev, size = self.cfg.eval, self.cfg.student.img_size
        classifier = load_classifier(ev.classifier_path, self.cfg.s3) if ev.classifier_path is not None else {}
        # the worker's teacher, else (stream: it runs on actors) its text tower rebuilt here, once
        teacher = self.targets.teacher or (self.targets.text_teacher() if "weights" not in classifier else None)
        pixels = labels = classifier_DC = retrieval = None
        if ev.input is not None:
            pixels, labels = load_eval_set(ev.input, self.cfg.s3, size, ev.max_images)
            if "weights" in classifier:
                classifier_DC = classifier["weights"]
            else:  # the run's teacher (the job refuses a source without one and no file)
                names, templates = prompts(ev.classes, ev.classnames, ev.templates)
                classifier_DC = teacher_classifier(teacher, names, templates)["weights"]
        if ev.retrieval_input is not None:
            cap_pixels, captions = load_caption_set(ev.retrieval_input, self.cfg.s3, size, ev.max_images)
            retrieval = (cap_pixels, captions, eval_caption_bank(classifier, teacher and teacher.encode_text, captions))
        return pixels, labels, classifier_DC, retrieval

    def export(self, folder: Path, step: int) -> None:
        extra = {"run_name": self.cfg.run.name, "step": step, "teacher": self.provenance,
                 "teacher_mode": self.cfg.data.teacher_mode}
        export_student(self.student, folder, mean=self.targets.mean, std=self.targets.std, extra=extra)
        teacher = self.targets.text_teacher()
        if teacher is not None:
            write_open_clip(folder, teacher.model, teacher.arch, teacher.pretrained)

    def meta(self) -> dict[str, Any]:
        return {"mean": list(self.targets.mean), "std": list(self.targets.std), "teacher": self.provenance}

    def on_run_start(self, log_artifact) -> None:
        prob_HW = masking_probability(self.mask_gen, num_samples=2000)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "masking_probability.png"
            plot_masking_maps({f"{self.cfg.mask.strategy} ({self.cfg.mask.mask_ratio})": prob_HW}, path)
            log_artifact(str(path))

    def describe(self) -> str:
        return f"{self.cfg.objective.name}, {self.cfg.data.teacher_mode} teacher"

"""Zero-shot evaluation of a student: its CLS embedding (after the head) against a classifier
built from the teacher's text tower, stored once in a small torch file so that training
workers in cache mode never need the teacher.

Classifier file: ``{"weights": (D, C) float32, "classnames": [...], "templates": [...],
"teacher": {arch, pretrained, embed_dim}}``.

Shape legend: M images, D joint embed dim, C classes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from uta_core.data import to_model_input
from uta_core.storage import S3Options, filesystem_for, read_bytes, write_bytes_atomic
from uta_core.student import UTAStudent
from uta_core.teacher import Teacher
from uta_core.zeroshot import build_classifier, classify, templates_and_classnames, topk_accuracy


def prompts(
    name: str | None, classnames: Sequence[str] | None, templates: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(class names, template strings) from a built-in set name or explicit lists."""
    if name is not None:
        prompt_set = templates_and_classnames(name)
        # The built-in templates are callables; record them as strings for the file.
        return list(prompt_set.classnames), [t("{}") for t in prompt_set.templates]
    if not classnames or not templates:
        raise ValueError("set eval.prompts (e.g. imagenet) or both eval.classnames and eval.templates")
    return list(classnames), list(templates)


def teacher_classifier(teacher: Teacher, classnames: Sequence[str], templates: Sequence[str]) -> dict[str, Any]:
    weights_DC = build_classifier(teacher.encode_text, classnames, templates).cpu()
    return {
        "weights": weights_DC,
        "classnames": list(classnames),
        "templates": list(templates),
        "teacher": {"arch": teacher.arch, "pretrained": teacher.pretrained, "embed_dim": teacher.embed_dim},
    }


def save_classifier(classifier: dict[str, Any], uri: str, s3: S3Options | None = None) -> None:
    fs, path = filesystem_for(uri, s3 or S3Options())
    buf = io.BytesIO()
    torch.save(classifier, buf)
    write_bytes_atomic(fs, path, buf.getvalue())


def load_classifier(uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    fs, path = filesystem_for(uri, s3 or S3Options())
    data = read_bytes(fs, path)
    if data is None:
        raise ValueError(
            f"classifier file {uri} does not exist; write it with `python pipelines/evaluate.py build-classifier`"
        )
    classifier = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(classifier, dict) or "weights" not in classifier:
        raise ValueError(f"{uri} is not a classifier file (a dict with weights (D, C), classnames, templates)")
    return classifier


@torch.no_grad()
def student_embeddings(
    student: UTAStudent,
    pixels_MHW3: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """CLS embeddings after the head, (M, D), for uint8 views; the student is put in eval mode."""
    was_training = student.training
    student.eval()
    chunks = []
    for start in range(0, pixels_MHW3.shape[0], batch_size):
        x_B3HW = to_model_input(pixels_MHW3[start : start + batch_size].to(device), tuple(mean), tuple(std))
        chunks.append(student(x_B3HW)[:, 0].float().cpu())
    student.train(was_training)
    return torch.cat(chunks)


def zeroshot_accuracy(
    student: UTAStudent,
    pixels_MHW3: torch.Tensor,
    labels_M: torch.Tensor,
    weights_DC: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy: ``{"zeroshot_top1": ..., "zeroshot_top5": ...}``."""
    if weights_DC.shape[0] != student.out_dim:
        raise ValueError(
            f"the classifier has dim {weights_DC.shape[0]} but the student's head gives {student.out_dim}: "
            "build the classifier with the student's teacher"
        )
    emb_MD = student_embeddings(student, pixels_MHW3, mean, std, batch_size=batch_size, device=device)
    acc = topk_accuracy(classify(emb_MD, weights_DC), labels_M, ks=(1, 5))
    return {"zeroshot_top1": acc[1], "zeroshot_top5": acc[5]}

"""Zero-shot evaluation: the one evaluator for students, teachers and CLIPs.

A student's embedding is its CLS token after the head; a teacher's or a CLIP's is open_clip's
``encode_image``. The classifier is built once from a text tower and can be stored in a small
torch file, so that training workers in cache mode never need the teacher.

Retrieval (image <-> text recall@1/5/10) runs on captioned images against the same text tower;
the classifier file can carry the caption embeddings of an eval set (``captions``) for the same
reason.

Classifier file: ``{"weights": (D, C) float32, "classnames": [...], "templates": [...],
"teacher": {arch, pretrained, embed_dim}, "captions": {"texts": [...], "embeddings": (U, D)} (optional)}``.

Shape legend: M images, D joint embed dim, C classes, U distinct caption texts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uta_core.data.storage import S3Options, filesystem_for, read_bytes, write_bytes_atomic
from uta_core.data.views import to_model_input
from uta_core.eval.zeroshot import (
    build_classifier,
    caption_positives,
    classify,
    recall_at_k,
    templates_and_classnames,
    topk_accuracy,
)
from uta_core.models.student import UTAStudent
from uta_core.models.teacher import Teacher


def prompts(
    name: str | None, classnames: Sequence[str] | None, templates: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(class names, template strings) from a built-in set name or explicit lists."""
    if name is not None:
        prompt_set = templates_and_classnames(name)
        # The built-in templates are callables; record them as strings for the file.
        return list(prompt_set.classnames), [t("{}") for t in prompt_set.templates]
    if not classnames or not templates:
        raise ValueError("set classes (e.g. imagenet) or both eval.classnames and eval.templates")
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


def student_encoder(student: UTAStudent) -> Callable[[torch.Tensor], torch.Tensor]:
    """A student's image embedding, as CLIP's ``encode_image``: the CLS token after the head, (B, D)."""
    return lambda images_B3HW: student(images_B3HW)[:, 0]


@torch.no_grad()
def image_embeddings(
    encode_image: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    pixels_MHW3: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Embeddings (M, D) of uint8 views under any ``encode_image`` (normalised (B, 3, H, W) -> (B, D));
    a student is run in eval mode through ``student_encoder``."""
    module = encode_image if isinstance(encode_image, nn.Module) else None
    if isinstance(encode_image, UTAStudent):
        encode_image = student_encoder(encode_image)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    chunks = []
    for start in range(0, pixels_MHW3.shape[0], batch_size):
        x_B3HW = to_model_input(pixels_MHW3[start : start + batch_size].to(device), tuple(mean), tuple(std))
        chunks.append(encode_image(x_B3HW).float().cpu())
    if module is not None:
        module.train(was_training)
    return torch.cat(chunks)


def zeroshot_accuracy(
    encode_image: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    pixels_MHW3: torch.Tensor,
    labels_M: torch.Tensor,
    weights_DC: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy of a student, a teacher or a CLIP image tower:
    ``{"zeroshot_top1": ..., "zeroshot_top5": ...}``."""
    emb_MD = image_embeddings(encode_image, pixels_MHW3, mean, std, batch_size=batch_size, device=device)
    return zeroshot_of_embeddings(emb_MD, labels_M, weights_DC)


def zeroshot_of_embeddings(emb_MD: torch.Tensor, labels_M: torch.Tensor, weights_DC: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 of image embeddings against a classifier (D, C)."""
    if weights_DC.shape[0] != emb_MD.shape[1]:
        raise ValueError(
            f"the classifier has dim {weights_DC.shape[0]} but the model embeds into {emb_MD.shape[1]} dims: "
            "build the classifier with the text tower of the model's (or the student's) teacher"
        )
    acc = topk_accuracy(classify(emb_MD, weights_DC), labels_M, ks=(1, 5))
    return {"zeroshot_top1": acc[1], "zeroshot_top5": acc[5]}


# --------------------------------------------------------------------- retrieval
RECALL_KS = (1, 5, 10)


def caption_bank(encode_text: Callable[[list[str]], torch.Tensor], captions: Sequence[str]) -> dict[str, Any]:
    """Normalised text embeddings of the distinct captions: ``{"texts": [U], "embeddings": (U, D)}``."""
    texts = sorted(set(captions))
    return {"texts": texts, "embeddings": F.normalize(encode_text(texts).float(), dim=-1).cpu()}


def eval_caption_bank(classifier: dict[str, Any], encode_text: Callable[[list[str]], torch.Tensor] | None,
                      captions: Sequence[str]) -> dict[str, Any]:
    """The eval captions' text embeddings: the classifier file's (``captions``), else ``encode_text``'s."""
    if "captions" in classifier:
        return classifier["captions"]
    if encode_text is None:
        raise ValueError("retrieval without a text tower needs caption embeddings in the classifier file: build it "
                         "with `evaluate.py build-classifier ... retrieval_input.paths=<the same shards>`")
    return caption_bank(encode_text, captions)


def retrieval_metrics(
    encode_image: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    pixels_MHW3: torch.Tensor,
    captions: Sequence[str],
    bank: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10: ``{"retrieval_i2t_r1": ..., "retrieval_t2i_r10": ...}``."""
    emb_MD = image_embeddings(encode_image, pixels_MHW3, mean, std, batch_size=batch_size, device=device)
    return retrieval_of_embeddings(emb_MD, captions, bank)


def retrieval_of_embeddings(emb_MD: torch.Tensor, captions: Sequence[str], bank: dict[str, Any]) -> dict[str, float]:
    """Recall@1/5/10 both ways of image embeddings and their captions against a caption bank."""
    texts, positives_MU = caption_positives(captions)
    index = {t: u for u, t in enumerate(bank["texts"])}
    missing = [t for t in texts if t not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} eval captions have no text embedding (e.g. {missing[0]!r}): build the classifier "
            "file with retrieval_input=<the same captioned shards>"
        )
    text_UD = bank["embeddings"][[index[t] for t in texts]]
    recall = recall_at_k(emb_MD, text_UD, positives_MU, RECALL_KS)
    out = {}
    for k in RECALL_KS:
        out[f"retrieval_i2t_r{k}"] = recall[f"image_to_text_R@{k}"]
        out[f"retrieval_t2i_r{k}"] = recall[f"text_to_image_R@{k}"]
    return out

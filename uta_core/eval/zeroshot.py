"""Zero-shot evaluation in the teacher's joint space: prompt classifiers, top-k, retrieval recall.

A class vector is the mean over prompt templates of L2-normalised text embeddings,
renormalised (CLIP's recipe); logits are 100 * normalised image embedding @ classifier.

Shape legend: B images, C classes, D embedding dim, I images (retrieval), T texts, P prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip import zero_shot_metadata

Template = Callable[[str], str]
_NAMED = {
    "imagenet": (zero_shot_metadata.IMAGENET_CLASSNAMES, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES),
    "imagenet-simple": (zero_shot_metadata.IMAGENET_CLASSNAMES, zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES),
}


class PromptSet(NamedTuple):
    templates: tuple[Template, ...]
    classnames: tuple[str, ...]


def templates_and_classnames(name: str) -> PromptSet:
    """A built-in prompt set: ``imagenet`` (80 OpenAI templates) or ``imagenet-simple`` (7)."""
    if name not in _NAMED:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {sorted(_NAMED)} or use custom_prompts")
    classnames, templates = _NAMED[name]
    return custom_prompts(classnames, templates)


def custom_prompts(classnames: Sequence[str], templates: Sequence[str | Template]) -> PromptSet:
    """Class names with templates given as callables or strings holding ``{}`` or ``{c}``."""
    if not classnames or not templates:
        raise ValueError("a prompt set needs at least one class name and one template")
    return PromptSet(tuple(as_template(t) for t in templates), tuple(classnames))


def as_template(template: str | Template) -> Template:
    if callable(template):
        return template
    if "{c}" in template:
        return lambda c: template.format(c=c)
    if "{}" in template:
        return lambda c: template.format(c)
    raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str | Template],
    batch_size: int = 1024,
) -> torch.Tensor:
    """Zero-shot weights (D, C): per class, the renormalised mean of normalised prompt embeddings."""
    fns = [as_template(t) for t in templates]
    texts = [fn(c) for c in classnames for fn in fns]  # class-major: C * P texts
    chunks = [encode_text(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
    emb_XD = torch.cat(chunks)  # (C * P, D)
    emb_CPD = F.normalize(emb_XD, dim=-1).reshape(len(classnames), len(fns), -1)
    return F.normalize(emb_CPD.mean(dim=1), dim=-1).T  # (D, C)


def classify(image_emb_BD: torch.Tensor, classifier_DC: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) = 100 * normalised image embedding @ classifier."""
    return 100.0 * F.normalize(image_emb_BD.float(), dim=-1) @ classifier_DC.to(image_emb_BD.device).float()


def topk_accuracy(
    logits_BC: torch.Tensor, labels_B: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of rows whose label is among the top k logits; k is clamped to C."""
    C = logits_BC.shape[1]
    top_BK = logits_BC.topk(min(max(ks), C), dim=1).indices
    hit_BK = top_BK == labels_B.to(top_BK.device)[:, None]
    return {k: hit_BK[:, : min(k, C)].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(
    image_emb_ID: torch.Tensor,
    text_emb_TD: torch.Tensor,
    text_to_image_T: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways by cosine similarity; ``text_to_image_T[t]`` is the image of caption t.

    Image->text counts a hit when any caption of the image is in its top k texts.
    """
    I, T = image_emb_ID.shape[0], text_emb_TD.shape[0]
    t2i_T = text_to_image_T.to(image_emb_ID.device).long()
    _check_captions(t2i_T, I, T)
    positives_IT = t2i_T[None, :] == torch.arange(I, device=t2i_T.device)[:, None]
    return recall_at_k(image_emb_ID, text_emb_TD, positives_IT, ks)


def caption_positives(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct caption texts and which image each belongs to: (texts U, positives (I, U) bool).

    Images that share a caption text share one text (digits: ten texts for every image), so a
    retrieved duplicate is not a miss; with distinct captions this is the usual benchmark.
    """
    texts = sorted(set(captions))
    index = {t: u for u, t in enumerate(texts)}
    positives_IU = torch.zeros(len(captions), len(texts), dtype=torch.bool)
    positives_IU[torch.arange(len(captions)), torch.tensor([index[c] for c in captions])] = True
    return texts, positives_IU


def recall_at_k(
    image_emb_ID: torch.Tensor,
    text_emb_TD: torch.Tensor,
    positives_IT: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways by cosine similarity; ``positives_IT[i, t]``: text t describes image i.

    Image->text: a hit when any text of the image is in its top k texts; text->image: when any
    of its images is in its top k images.
    """
    I, T = image_emb_ID.shape[0], text_emb_TD.shape[0]
    pos_IT = positives_IT.to(image_emb_ID.device)
    img_ID = F.normalize(image_emb_ID.float(), dim=-1)
    txt_TD = F.normalize(text_emb_TD.float(), dim=-1)
    top_texts_IK = _topk_rows(img_ID, txt_TD, min(max(ks), T))  # text indices
    top_images_TK = _topk_rows(txt_TD, img_ID, min(max(ks), I))  # image indices
    i2t_hit_IK = pos_IT.gather(1, top_texts_IK)
    t2i_hit_TK = pos_IT.T.gather(1, top_images_TK)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t_hit_IK[:, : min(k, T)].any(dim=1).float().mean().item()
        out[f"text_to_image_R@{k}"] = t2i_hit_TK[:, : min(k, I)].any(dim=1).float().mean().item()
    return out


def _check_captions(t2i_T: torch.Tensor, I: int, T: int) -> None:
    if t2i_T.shape != (T,):
        raise ValueError(
            f"text_to_image must hold one image index per text ({T}), got shape {tuple(t2i_T.shape)}"
        )
    if T and (t2i_T.min() < 0 or t2i_T.max() >= I):
        raise ValueError(f"text_to_image holds indices outside [0, {I}): every caption must name an image")
    missing = I - t2i_T.unique().numel()
    if missing:
        raise ValueError(f"{missing} of {I} images have no caption; drop them before computing recall")


def _topk_rows(query_AD: torch.Tensor, keys_BD: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices (A, k) of the k most similar keys per query, in chunks to bound memory."""
    return torch.cat([(q_aD @ keys_BD.T).topk(k, dim=1).indices for q_aD in query_AD.split(chunk)])

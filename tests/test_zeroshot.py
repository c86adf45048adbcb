"""Zero-shot classifier, top-k accuracy and retrieval recall against plain Python loops."""

import pytest
import torch
import torch.nn.functional as F

from uta_core.eval.zeroshot import (
    build_classifier,
    classify,
    custom_prompts,
    retrieval_recall,
    templates_and_classnames,
    topk_accuracy,
)

D, C = 16, 10
CLASSNAMES = [f"thing{c:02d}" for c in range(C)]
TEMPLATES = ["a photo of a {}.", "a drawing of the {c}.", lambda c: f"{c}, blurry"]


def _class_basis_CD() -> torch.Tensor:
    q_DD, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    return q_DD[:C]  # C orthonormal rows


def _fake_encode_text(texts: list[str]) -> torch.Tensor:
    """A text tower that maps each class name to its basis vector, plus per-prompt noise."""
    basis_CD = _class_basis_CD()
    rows = []
    for text in texts:
        c = next(i for i, name in enumerate(CLASSNAMES) if name in text)
        noise_D = torch.randn(D, generator=torch.Generator().manual_seed(sum(map(ord, text))))
        rows.append(3.0 * basis_CD[c] + 0.3 * noise_D)
    return torch.stack(rows)


def test_build_classifier_matches_a_per_class_loop():
    weights_DC = build_classifier(_fake_encode_text, CLASSNAMES, TEMPLATES, batch_size=4)
    fills = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of the {c}.", lambda c: f"{c}, blurry"]
    for c, name in enumerate(CLASSNAMES):
        embs = [_fake_encode_text([fill(name)])[0] for fill in fills]
        mean_D = sum(e / e.norm() for e in embs) / len(embs)
        torch.testing.assert_close(weights_DC[:, c], mean_D / mean_D.norm(), atol=1e-6, rtol=1e-5)


def test_matching_image_embeddings_give_full_top1():
    weights_DC = build_classifier(_fake_encode_text, CLASSNAMES, TEMPLATES)
    labels_B = torch.arange(40) % C
    gen = torch.Generator().manual_seed(1)
    images_BD = 5.0 * _class_basis_CD()[labels_B] + 0.5 * torch.randn(40, D, generator=gen)
    logits_BC = classify(images_BD, weights_DC)
    assert topk_accuracy(logits_BC, labels_B, ks=(1,))[1] == 1.0
    assert topk_accuracy(logits_BC, (labels_B + 1) % C, ks=(1,))[1] == 0.0
    cosine_BC = F.normalize(images_BD, dim=-1) @ weights_DC
    torch.testing.assert_close(logits_BC, 100 * cosine_BC)


@pytest.mark.parametrize("num_classes", [10, 3])
def test_topk_accuracy_matches_a_loop(num_classes):
    gen = torch.Generator().manual_seed(2)
    logits_BC = torch.randn(50, num_classes, generator=gen)
    labels_B = torch.randint(0, num_classes, (50,), generator=gen)
    got = topk_accuracy(logits_BC, labels_B, ks=(1, 5))
    for k in (1, 5):
        hits = 0
        for row, label in zip(logits_BC.tolist(), labels_B.tolist()):
            order = sorted(range(num_classes), key=lambda j: -row[j])
            hits += label in order[:k]
        assert got[k] == pytest.approx(hits / 50)
    if num_classes < 5:
        assert got[5] == 1.0


def test_retrieval_recall_matches_a_loop():
    gen = torch.Generator().manual_seed(3)
    I = 12
    captions_per_image = torch.randint(1, 4, (I,), generator=gen)
    text_to_image_T = torch.repeat_interleave(torch.arange(I), captions_per_image)
    text_to_image_T = text_to_image_T[torch.randperm(len(text_to_image_T), generator=gen)]
    images_ID = torch.randn(I, 6, generator=gen)
    texts_TD = images_ID[text_to_image_T] + 1.2 * torch.randn(len(text_to_image_T), 6, generator=gen)
    got = retrieval_recall(images_ID, texts_TD, text_to_image_T, ks=(1, 5, 10))

    sim = [[float(F.cosine_similarity(i, t, dim=0)) for t in texts_TD] for i in images_ID]
    owner = text_to_image_T.tolist()
    T = len(owner)
    for k in (1, 5, 10):
        i2t = sum(
            any(owner[t] == i for t in sorted(range(T), key=lambda t: -sim[i][t])[:k]) for i in range(I)
        ) / I
        t2i = sum(owner[t] in sorted(range(I), key=lambda i: -sim[i][t])[:k] for t in range(T)) / T
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0.0 < got["image_to_text_R@1"] < 1.0  # the noise makes the check non-trivial


def test_retrieval_refuses_images_without_captions():
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 2]))


def test_prompt_sets():
    imagenet = templates_and_classnames("imagenet")
    assert len(imagenet.classnames) == 1000 and len(imagenet.templates) == 80
    assert imagenet.templates[0]("goldfish") == "a bad photo of a goldfish."
    templates, classnames = custom_prompts(["cat"], ["a {}.", "the {c}!", lambda c: c.upper()])
    assert [t(classnames[0]) for t in templates] == ["a cat.", "the cat!", "CAT"]
    with pytest.raises(ValueError, match="placeholder"):
        custom_prompts(["cat"], ["no slot"])
    with pytest.raises(ValueError, match="unknown prompt set"):
        templates_and_classnames("cifar1000")

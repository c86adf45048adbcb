"""Losses against a slow per-token reference loop."""

import math

import pytest
import torch

from uta_core.objectives.alignment import fd_loss, gather_kept, keep_to_mask, mim_loss, uta_loss


def slow_weighted_cosine(student, teacher, weights):
    num = den = 0.0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            s, q = student[b, t].tolist(), teacher[b, t].tolist()
            cos = sum(a * c for a, c in zip(s, q)) / (
                math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(c * c for c in q))
            )
            num += weights[b][t] * cos
            den += weights[b][t]
    return -num / den


@pytest.mark.parametrize("cls_weight", [1.0, 0.0, 4.0])
def test_uta_loss_equals_slow_loop(cls_weight):
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 5), torch.randn(3, 6, 5)
    weights = [[cls_weight] + [1.0] * 5 for _ in range(3)]
    assert uta_loss(s, t, cls_weight).item() == pytest.approx(slow_weighted_cosine(s, t, weights), abs=1e-5)


def test_perfect_alignment_gives_minus_one_regardless_of_scale():
    t = torch.randn(2, 9, 8)
    assert uta_loss(t * 3.0, t).item() == pytest.approx(-1.0, abs=1e-6)
    assert uta_loss(-t, t).item() == pytest.approx(1.0, abs=1e-6)


def test_gather_kept_matches_indexing_loop():
    tokens = torch.randn(2, 1 + 10, 4)
    keep = torch.tensor([[0, 3, 7], [2, 5, 9]])
    out = gather_kept(tokens, keep)
    for b in range(2):
        assert torch.equal(out[b, 0], tokens[b, 0])
        for j, k in enumerate(keep[b].tolist()):
            assert torch.equal(out[b, 1 + j], tokens[b, 1 + k])


def test_mim_loss_counts_masked_patches_only():
    torch.manual_seed(1)
    s, t = torch.randn(2, 1 + 6, 4), torch.randn(2, 1 + 6, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    weights = [[0.0] + m.float().tolist() for m in mask]
    assert mim_loss(s, t, mask).item() == pytest.approx(slow_weighted_cosine(s, t, weights), abs=1e-5)
    # Changing a kept (unmasked) token of the student does not change the loss.
    s2 = s.clone()
    s2[0, 2] += 10
    assert mim_loss(s2, t, mask).item() == pytest.approx(mim_loss(s, t, mask).item(), abs=1e-6)


def test_fd_loss_is_uta_over_all_tokens():
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    all_idx = torch.arange(4).expand(2, -1)
    assert fd_loss(s, t).item() == pytest.approx(uta_loss(gather_kept(s, all_idx), gather_kept(t, all_idx)).item())


def test_keep_to_mask_is_the_complement():
    keep = torch.tensor([[0, 2], [1, 3]])
    assert keep_to_mask(keep, 4).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_shape_mismatch_names_the_problem():
    with pytest.raises(ValueError, match="grids or embedding dims"):
        uta_loss(torch.randn(1, 5, 4), torch.randn(1, 5, 8))


def test_gradient_flows_to_student_only():
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, requires_grad=False)
    uta_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_uta_mim_feeds_mask_tokens_and_scores_every_token_against_a_slow_loop():
    """Tab. 6's UTA+MIM: [MASK]ed sequence in, alignment of unmasked + prediction of masked tokens."""
    from uta_core.models.student import build_student
    from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, prepare_student, step_loss

    torch.manual_seed(0)
    student = build_student("nano", img_size=16, patch_size=4, out_dim=8)
    obj = ObjectiveConfig(name="uta_mim", cls_weight=1.0)
    prepare_student(student, obj)
    images, teacher = torch.randn(2, 3, 16, 16), torch.randn(2, 17, 8)
    keep = torch.tensor([[0, 3, 5, 9, 10, 11, 12, 15], [1, 2, 4, 6, 7, 8, 13, 14]])
    loss = step_loss(StudentForward(student, obj), images, teacher, keep, obj)
    pred = student.forward_masked(images, keep_to_mask(keep, 16))
    assert loss.item() == pytest.approx(slow_weighted_cosine(pred, teacher, [[1.0] * 17] * 2), abs=1e-5)
    loss.backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0

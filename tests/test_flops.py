"""Analytic FLOPs against torch's FLOP counter on the real modules."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from uta_core.models.flops import ViTShape, step_flops, student_shape, teacher_shape, vit_forward_flops
from uta_core.models.student import build_student


def measured_forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("variant, img, patch", [("nano", 32, 4), ("tiny", 56, 14), ("small", 28, 14)])
@pytest.mark.parametrize("ratio", [0.4, 0.5])
def test_student_kept_forward_matches_flop_counter(variant, img, patch, ratio):
    model = build_student(variant, img_size=img, patch_size=patch, out_dim=32).eval()
    for block in model.trunk.blocks:
        block.attn.fused_attn = False  # explicit matmuls, so the counter sees attention
    shape = student_shape(variant, img_size=img, patch_size=patch, out_dim=32)
    n = model.num_patches
    keep = torch.arange(round(n * (1 - ratio)))[None]
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        kept = measured_forward_flops(lambda: model.forward_kept(x, keep))
        full = measured_forward_flops(lambda: model(x))
    assert step_flops("uta", shape, ratio).student_forward == pytest.approx(kept, rel=0.01)
    assert step_flops("fd", shape, ratio).student_forward == pytest.approx(full, rel=0.01)


def test_teacher_token_forward_matches_flop_counter():
    """The teacher as it runs (every token normed and projected) against torch's counter.

    The counter cannot see fused attention kernels: nn.MultiheadAttention's inference fast
    path is turned off and SDPA's math backend spells attention out in matmuls, so the counter
    sees QK^T and AV too; nothing is added by hand.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from uta_core.models.teacher import Teacher, TeacherConfig, build_teacher

    teacher: Teacher = build_teacher(TeacherConfig(arch="ViT-B-32"), random_seed=0)
    shape = teacher_shape("ViT-B-32")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            measured = measured_forward_flops(lambda: teacher.encode_tokens(torch.randn(1, 3, 224, 224)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert vit_forward_flops(shape, 1 + shape.num_patches) == pytest.approx(measured, rel=0.001)


def test_uta_costs_about_half_of_mim_at_ratio_half_for_base():
    base = student_shape("base")
    uta = step_flops("uta", base, 0.5).student_step
    mim = step_flops("mim", base, 0.5).student_step
    assert 0.45 < uta / mim < 0.52
    ratio_04 = step_flops("uta", base, 0.4).student_step / step_flops("mim", base, 0.4).student_step
    assert 0.55 < ratio_04 < 0.62  # the paper's ~0.6x


def test_teacher_counted_separately_and_unknown_objective():
    base, teacher = student_shape("base"), teacher_shape("ViT-L-14")
    flops = step_flops("uta", base, 0.5, teacher)
    assert flops.total == flops.student_step + flops.teacher_forward > flops.student_step
    assert step_flops("uta", base, 0.5).teacher_forward == 0
    with pytest.raises(ValueError, match="objective"):
        step_flops("mae", base, 0.5)


def test_vit_flops_quadratic_term():
    shape = ViTShape(embed_dim=8, depth=1, mlp_hidden=16, mlp_matrices=2, patch_size=1, num_patches=0, out_dim=0)
    linear_part = lambda t: 2 * t * 8 * 24 + 2 * t * 64 + 2 * t * 8 * 16 * 2  # noqa: E731
    for t in (1, 5, 10):
        assert vit_forward_flops(shape, t) - linear_part(t) == 4 * t * t * 8

"""Student: kept-token forward against the full forward, gradients, sizes against timm."""

import pytest
import timm
import torch

from uta_core.models.export import timm_architecture
from uta_core.models.student import TIMM_NAMES, VARIANTS, StudentConfig, build_student, eva_kwargs


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return build_student("nano", img_size=32, patch_size=4, out_dim=24).eval()


def test_forward_kept_all_positions_shuffled_equals_permuted_full_forward(nano):
    x = torch.randn(3, 3, 32, 32)
    full_BND = nano(x)
    perm_BN = torch.stack([torch.randperm(nano.num_patches) for _ in range(3)])
    kept_BND = nano.forward_kept(x, perm_BN)
    expected = torch.cat([full_BND[:, :1], full_BND[:, 1:][torch.arange(3)[:, None], perm_BN]], dim=1)
    torch.testing.assert_close(kept_BND, expected, atol=1e-5, rtol=1e-5)


def test_forward_kept_is_not_a_subset_of_full_forward_when_tokens_are_dropped(nano):
    # Attention sees fewer tokens, so kept outputs differ from the full-sequence outputs.
    x = torch.randn(2, 3, 32, 32)
    keep_BK = torch.arange(0, 64, 2).expand(2, -1)
    kept = nano.forward_kept(x, keep_BK)
    assert kept.shape == (2, 33, 24)
    assert not torch.allclose(kept[:, 1:], nano(x)[:, 1:][:, ::2], atol=1e-3)


def test_rotary_gather_matters(nano):
    # The same tokens with a wrong rotary table must change the output; guards the test above.
    x = torch.randn(1, 3, 32, 32)
    perm = torch.randperm(64)[None]
    good = nano.forward_kept(x, perm)
    rope = nano.trunk.rope
    original = rope.get_embed
    rope.get_embed = lambda: original().roll(1, dims=0)
    try:
        bad = nano.forward_kept(x, perm)
    finally:
        rope.get_embed = original
    assert (good - bad).abs().max() > 1e-3


def test_forward_masked_with_nothing_masked_equals_forward(nano):
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    torch.testing.assert_close(nano.forward_masked(x, mask), nano(x), atol=1e-5, rtol=1e-5)


def test_forward_masked_uses_mask_token(nano):
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :32] = True
    y1 = nano.forward_masked(x, mask)
    y2 = nano.forward_masked(x + torch.randn_like(x) * (torch.arange(32)[None, None, :, None] < 16), mask)
    # Rows 0..15 of pixels are patches 0..31 (8 per row of 4 px): fully masked, so no effect.
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"giant"}))  # giant: 1B weights, too big for CI
def test_every_parameter_gets_a_gradient_and_no_nan(variant):
    torch.manual_seed(0)
    model = build_student(variant, img_size=56, patch_size=14, out_dim=32)
    x = torch.randn(2, 3, 56, 56)
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 12, 15]])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    out = model.forward_kept(x, keep).sum() + model.forward_masked(x, mask).sum()
    out.backward()
    assert torch.isfinite(out)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def _trunk_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("trunk."))


@pytest.mark.parametrize("variant", sorted(TIMM_NAMES))
def test_eva02_sizes_match_timm_eva02_as_timm_registers_it(variant):
    with torch.device("meta"):
        ours = build_student(variant, out_dim=512)
        ref = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=0)
    assert _trunk_params(ours) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_rebuilds_in_timm_from_what_an_export_tells_it(variant):
    cfg = StudentConfig(variant=variant, img_size=56, patch_size=14, out_dim=32)
    with torch.device("meta"):
        ours = build_student(variant, img_size=56, patch_size=14, out_dim=32)
        ref = timm.create_model(timm_architecture(cfg), pretrained=False, **eva_kwargs(cfg))
    assert _trunk_params(ours) == sum(p.numel() for p in ref.parameters())


def test_grid_and_dims():
    m = build_student("nano", img_size=224, patch_size=16, out_dim=64)
    assert m.grid == (14, 14) and m.num_patches == 196 and m.out_dim == 64


def test_grad_checkpointing_gives_the_same_output(nano):
    x = torch.randn(2, 3, 32, 32)
    keep = torch.arange(10).expand(2, -1)
    ref = nano.forward_kept(x, keep)
    nano.set_grad_checkpointing(True)
    nano.train()
    try:
        out = nano.forward_kept(x, keep)
    finally:
        nano.set_grad_checkpointing(False)
        nano.eval()
    torch.testing.assert_close(out, ref)


def test_no_weight_decay_names_exist(nano):
    names = dict(nano.named_parameters())
    nwd = nano.no_weight_decay()
    assert {"trunk.pos_embed", "trunk.cls_token", "mask_token"} <= nwd
    assert nwd <= set(names)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="huge"), "variant"),
        (dict(img_size=30, patch_size=4), "multiple"),
        (dict(out_dim=0), "out_dim"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudentConfig(**kwargs)

"""Teacher: projected tokens against open_clip's own outputs, freezing, grids, weight loading."""

import open_clip
import pytest
import torch
from helpers import TINY_ARCH, tiny_clip_model, tiny_clip_teacher, write_model_config

from uta_core.config import from_dict
from uta_core.models.teacher import (
    Teacher,
    TeacherConfig,
    build_teacher,
    check_grid,
    image_size_for_grid,
)
from uta_core.models.teacher_weights import check_weights_chosen


@pytest.fixture(scope="module")
def teacher():
    return tiny_clip_teacher()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_cls_token_is_open_clip_image_embedding(teacher, images):
    tokens_BTD = teacher.encode_tokens(images)
    assert tokens_BTD.shape == (3, 1 + 64, 32)
    torch.testing.assert_close(tokens_BTD[:, 0], teacher.model.encode_image(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_patch_tokens_are_ln_post_then_proj_of_open_clip_tokens(final_ln_after_pool, images):
    model = tiny_clip_model(final_ln_after_pool=final_ln_after_pool)
    teacher = Teacher(model, arch=TINY_ARCH)
    visual = model.visual
    visual.output_tokens = True
    pooled_BD, raw_BNW = visual(images)  # open_clip: unprojected patch tokens
    visual.output_tokens = False
    normed_BNW = visual.ln_post(raw_BNW) if final_ln_after_pool else raw_BNW  # else already normed
    expected_BND = normed_BNW @ visual.proj
    tokens_BTD = teacher.encode_tokens(images)
    torch.testing.assert_close(tokens_BTD[:, 1:], expected_BND, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens_BTD[:, 0], pooled_BD, atol=1e-5, rtol=1e-5)
    assert teacher.embed_dim == 32 and raw_BNW.shape[-1] == 64


@pytest.mark.parametrize(
    "vision, why",
    [(dict(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4), "attention"),
     (dict(pool_type="avg"), "pool_type='avg'")],
)
def test_refuses_towers_without_a_projected_cls(vision, why):
    with pytest.raises(NotImplementedError, match=why):
        Teacher(tiny_clip_model(**vision), arch="refused")


def _tiny_timm_clip(**vision):
    torch.manual_seed(0)
    vision_cfg = dict(timm_model_name="eva02_tiny_patch14_224", timm_pool="token", timm_proj=None)
    vision_cfg.update(vision)
    text_cfg = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    model = open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    model.visual.set_input_size(56)  # 4x4 grid keeps the 12-block tower fast
    if isinstance(model.visual.trunk.head, torch.nn.Linear):  # timm inits it near zero (1e-3 scale)
        torch.nn.init.normal_(model.visual.trunk.head.weight, std=0.05)
    return model


def test_timm_tower_tokens_are_trunk_head_of_normed_tokens():
    model = _tiny_timm_clip()
    teacher = Teacher(model, arch="eva02-tiny-test")
    assert (teacher.grid, teacher.patch_size, teacher.image_size) == ((4, 4), 14, 56)
    x = torch.randn(2, 3, 56, 56)
    tokens_BTD = teacher.encode_tokens(x)
    torch.testing.assert_close(tokens_BTD[:, 0], model.encode_image(x), atol=1e-5, rtol=1e-5)
    out = model.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
    expected_BND = model.visual.trunk.head(out["image_intermediates"][-1])  # normed, then projected
    torch.testing.assert_close(tokens_BTD[:, 1:], expected_BND, atol=1e-5, rtol=1e-5)


def test_refuses_timm_tower_with_avg_pool_and_fc_norm():
    with pytest.raises(NotImplementedError, match="global_pool='avg'"):
        Teacher(_tiny_timm_clip(timm_pool="avg", timm_proj="linear"), arch="eva02-avg")


def test_teacher_is_frozen_and_stays_in_eval(teacher, images):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not teacher.encode_tokens(images).requires_grad


def test_metadata_and_text_encoder(teacher):
    assert (teacher.image_size, teacher.patch_size, teacher.grid, teacher.num_patches) == (32, 4, (8, 8), 64)
    assert teacher.mean == open_clip.OPENAI_DATASET_MEAN and teacher.std == open_clip.OPENAI_DATASET_STD
    texts = ["a photo of a cat", "a dog", "x", "a car", "the sea"]
    ref_TD = teacher.model.encode_text(teacher.tokenizer(texts))
    torch.testing.assert_close(teacher.encode_text(texts, batch_size=2), ref_TD, atol=1e-5, rtol=1e-5)


def test_image_size_forcing_changes_the_grid(tmp_path):
    arch = str(write_model_config(tmp_path))
    teacher = Teacher.from_open_clip(arch, image_size=48)
    assert (teacher.image_size, teacher.grid, teacher.num_patches) == (48, (12, 12), 144)
    assert teacher.encode_tokens(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 144, 32)


def test_refuses_an_image_size_that_is_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of 4"):
        Teacher(tiny_clip_model(image_size=30), arch="ragged")


def test_check_grid_says_what_to_set():
    check_grid((14, 14), (14, 14))
    with pytest.raises(ValueError, match=r"teacher\.image_size=196 so the /14 teacher gives 14x14") as err:
        check_grid((14, 14), (16, 16), student_patch_size=16, teacher_patch_size=14)
    expected = "student grid 14x14 (224 px / patch 16) != teacher grid 16x16 (224 px / patch 14)"
    assert expected in str(err.value)
    assert image_size_for_grid((14, 14), 14) == 196


def test_teacher_check_grid_uses_its_patch_size(teacher):
    teacher.check_grid((8, 8), student_patch_size=4)
    with pytest.raises(ValueError, match=r"teacher\.image_size=16 so the /4 teacher gives 4x4"):
        teacher.check_grid((4, 4), student_patch_size=8)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loads_weights_from_a_local_file(tmp_path, images, suffix):
    arch = str(write_model_config(tmp_path))
    source = Teacher.from_open_clip(arch)  # random init, registers the config
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.model.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = Teacher.from_open_clip(TINY_ARCH, pretrained=str(path))  # by the registered name
    torch.testing.assert_close(loaded.encode_tokens(images), source.encode_tokens(images), atol=0, rtol=0)
    assert loaded.weights_fingerprint() == source.weights_fingerprint()
    assert loaded.pretrained == str(path)
    other = Teacher.from_open_clip(arch)  # a fresh random init
    assert other.weights_fingerprint() != source.weights_fingerprint()
    resized = Teacher.from_open_clip(arch, str(path), image_size=48)  # pos-embed resampled on load
    assert resized.grid == (12, 12)


def test_bad_sources_are_value_errors(tmp_path):
    arch = str(write_model_config(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        Teacher.from_open_clip(arch, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="neither a known open_clip tag"):
        Teacher.from_open_clip(arch, pretrained="no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        Teacher.from_open_clip("ViT-Nope-1")
    with pytest.raises(ValueError, match="does not exist"):
        Teacher.from_open_clip(str(tmp_path / "nope.json"))


def test_config_validates_and_builds(tmp_path):
    arch = str(write_model_config(tmp_path))
    cfg = from_dict(TeacherConfig, {"arch": arch, "image_size": 40})
    assert build_teacher(cfg, random_seed=0).grid == (10, 10)
    with pytest.raises(ValueError, match="teacher_random_seed"):
        build_teacher(cfg, random_seed=None)  # random weights only on purpose
    with pytest.raises(ValueError, match="precision"):
        TeacherConfig(precision="fp8")
    with pytest.raises(ValueError, match="image_size"):
        TeacherConfig(image_size=0)


@pytest.mark.parametrize("arch,tag,fix", [
    ("ViT-L-14", "openai", "teacher.arch=ViT-L-14-quickgelu"),  # the shipped cluster configs' old mistake
    ("ViT-B-16", "metaclip_fullcc", "teacher.arch=ViT-B-16-quickgelu"),
    ("ViT-B-16-quickgelu", "laion2b_s34b_b88k", None),  # no such tag for the quickgelu arch: open_clip decides
])
def test_hub_weights_on_an_architecture_with_another_activation_are_refused(arch, tag, fix):
    """open_clip's pretrained config of each tag says whether it needs QuickGELU; open_clip itself only warns."""
    if fix is None:
        check_weights_chosen(arch, tag, None)
        return
    with pytest.raises(ValueError, match="trained with QuickGELU") as err:
        check_weights_chosen(arch, tag, None)
    assert fix in str(err.value)


def test_every_hub_tag_passes_with_the_activation_it_needs():
    for arch, tag in open_clip.list_pretrained():
        needs = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
        right = arch.removesuffix("-quickgelu") + ("-quickgelu" if needs else "")
        if right in open_clip.list_models():
            check_weights_chosen(right, tag, None)

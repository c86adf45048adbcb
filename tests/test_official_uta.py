"""The student against the official UTA model code (tests/reference/uta_official, unmodified).

Same weights in both -> same CLS embedding, same tokens, same kept-token outputs (the
official kept path is its RoPE patch-dropout route), within 1e-4 relative. And the
released checkpoints' state-dict layout loads into the student through
``uta_core.models.official``, head included, with everything unmappable refused.
"""

from __future__ import annotations

import contextlib
import io
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from uta_core.models.official import (
    OfficialCheckpointError,
    load_official_student,
    official_student_config,
    student_state_from_official,
)
from uta_core.models.student import StudentConfig, UTAStudent

sys.path.insert(0, str(Path(__file__).parent / "reference"))
with contextlib.redirect_stdout(io.StringIO()):  # it prints a hint when xformers is missing
    from uta_official import eva_vit as official  # noqa: E402
    from uta_official.transformer import LayerNorm  # noqa: E402


def _official_tower(img_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float,
                    out_dim: int, patch_dropout: float = 0.0):
    """The official factory's settings (eva_base_p16 & co.) at any size; xattn off (no xformers on CPU)."""
    torch.manual_seed(0)
    model = official.EVAVisionTransformer(
        img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=width, num_heads=heads,
        mlp_ratio=mlp_ratio, num_classes=out_dim, xattn=False, rope=True, intp_freq=True, naiveswiglu=True,
        subln=True, use_mean_pooling=False, qkv_bias=True, norm_layer=partial(LayerNorm, eps=1e-6),
        patch_dropout=patch_dropout,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ffn_ln" in name:  # zeros/ones would hide a mix-up
                p.add_(torch.randn_like(p) * 0.1)
            if name.startswith("blocks.") and p.ndim == 2:  # unit-gain layers: attention (and so RoPE)
                p.normal_(0, p.shape[1] ** -0.5)             # shapes the output, not just the residual
            if "q_proj" in name or "k_proj" in name:  # sharp attention, so positions matter
                p.mul_(3.0)
    return model.eval()


def _student_like(tower, img_size: int, patch_size: int, heads: int, **cfg) -> UTAStudent:
    width, depth = tower.embed_dim, len(tower.blocks)
    student = UTAStudent(StudentConfig(variant="base", img_size=img_size, patch_size=patch_size,
                                       out_dim=tower.head.out_features,
                                       overrides=dict(embed_dim=width, depth=depth, num_heads=heads), **cfg))
    missing, unexpected = student.load_state_dict(student_state_from_official(tower.state_dict()), strict=False)
    assert unexpected == [] and missing == ["mask_token"]
    return student.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


GEOMETRIES = [(56, 14), (224, 16), (336, 14)]  # grids 4x4, 14x14 (UTA-B), 24x24 (UTA-L/g at 336)


@pytest.mark.parametrize("img_size, patch_size", GEOMETRIES)
def test_cls_and_all_tokens_equal_the_official_tower(img_size, patch_size):
    tower = _official_tower(img_size, patch_size, width=64, depth=2, heads=4, mlp_ratio=2.6667, out_dim=32)
    student = _student_like(tower, img_size, patch_size, heads=4)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        cls_official = tower(x)  # head(norm(x)[:, 0]): what encode_image returns
        tokens_official = tower.head(tower.norm(tower.forward_features(x, return_all_features=True)))
        ours = student(x)
    assert _rel(ours[:, 0], cls_official) < 1e-4
    assert _rel(ours, tokens_official) < 1e-4


@pytest.mark.parametrize("img_size, patch_size", GEOMETRIES)
def test_kept_tokens_equal_the_official_rope_patch_dropout_path(img_size, patch_size, monkeypatch):
    """The official code's own kept-token route: PatchDropout hands its indices to the RoPE."""
    monkeypatch.setenv("RoPE", "1")
    tower = _official_tower(img_size, patch_size, width=64, depth=2, heads=4, mlp_ratio=2.6667, out_dim=32,
                            patch_dropout=0.5)
    student = _student_like(tower, img_size, patch_size, heads=4)
    seen = {}
    tower.patch_dropout.register_forward_hook(lambda mod, inp, out: seen.update(keep=out[1]))
    tower.train()  # PatchDropout only drops in training; every dropout rate is 0
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        kept_official = tower.head(tower.norm(tower.forward_features(x, return_all_features=True)))
        keep_BK = seen["keep"]
        ours = student.forward_kept(x, keep_BK)
    assert keep_BK.shape[1] == (img_size // patch_size) ** 2 // 2
    assert _rel(ours, kept_official) < 1e-4


def test_a_student_whose_rope_grid_is_its_own_grid_differs_from_the_official_tower():
    """What the 16x16 reference grid fixes: 14x14 positions on a 14x14 grid give other outputs."""
    tower = _official_tower(224, 16, width=64, depth=2, heads=4, mlp_ratio=2.6667, out_dim=32)
    student = _student_like(tower, 224, 16, heads=4, rope_ref_grid=14)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        # 1e-4 is the equality tests' tolerance: they would catch this grid (the right one agrees to ~1e-8)
        assert _rel(student(x), tower.head(tower.norm(tower.forward_features(x, True)))) > 1e-4


def _official_clip_state(tower) -> dict[str, torch.Tensor]:
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state["text.token_embedding.weight"] = torch.randn(10, 8)
    state["logit_scale"] = torch.tensor(4.6052)
    return state


@pytest.fixture(scope="module")
def uta_b():
    """The released UTA-B/16 tower (eva_base_p16), random weights; xattn off for the CPU."""
    with contextlib.redirect_stdout(io.StringIO()):
        tower = official.eva_base_p16()
    for blk in tower.blocks:
        blk.attn.xattn = False
    return tower.eval()


def test_the_uta_b_checkpoint_layout_loads_with_head_and_gives_the_official_embedding(uta_b):
    ckpt = load_official_student(_official_clip_state(uta_b))
    cfg = ckpt.student.cfg
    assert (cfg.variant, cfg.img_size, cfg.patch_size, cfg.out_dim) == ("base", 224, 16, 1024)
    assert set(ckpt.text_state) == {"token_embedding.weight"} and float(ckpt.logit_scale) == pytest.approx(4.6052)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _rel(ckpt.student(x)[:, 0], uta_b(x)) < 1e-4


def test_the_released_tower_sizes_map_to_our_variants(monkeypatch):
    linspace = torch.linspace  # the official code reads drop-path rates with .item(): keep those on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    for factory, expected in ((official.eva_large_p14_336, ("large", 336, 14)),
                              (official.eva_giant_p14_336, ("giant", 336, 14))):
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            tower = factory()
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in tower.state_dict().items()}
        cfg = official_student_config(shapes)
        assert (cfg.variant, cfg.img_size, cfg.patch_size, cfg.out_dim) == (*expected, 1024)
        with torch.device("meta"):
            ours = UTAStudent(cfg).state_dict()
        mapped = student_state_from_official(shapes)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {
            k: tuple(v.shape) for k, v in ours.items() if k != "mask_token"}


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update({"visual.extra.weight": torch.zeros(1)}), "no place in the student"),
    (lambda s: s.pop("visual.blocks.0.mlp.w3.weight"), "does not hold"),
    (lambda s: s.update({"optimizer": {}}), "cannot be mapped"),
    (lambda s: s.update({"visual.rope.freqs_cos": s["visual.rope.freqs_cos"] * 0.5}), "rotary table"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("visual.")], "no visual"),
])
def test_what_cannot_be_mapped_is_refused(uta_b, edit, match):
    state = _official_clip_state(uta_b)
    edit(state)
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official_student(state)



def test_evaluate_loads_a_released_checkpoint_file(uta_b, tmp_path):
    from uta_core.data.storage import S3Options
    from uta_core.models.trained import load_trained_student

    path = tmp_path / "UTA-B.pt"
    torch.save(_official_clip_state(uta_b), path)
    student, mean, std, info = load_trained_student(str(path), S3Options())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _rel(student(x)[:, 0], uta_b(x)) < 1e-4
    assert info["official"] and mean[0] == pytest.approx(0.48145466)
    # pre-training may start from it (init_from): checked from its shapes before any worker starts
    from uta_core.models.trained import check_start

    check_start(str(path), student.cfg, S3Options())
    with pytest.raises(ValueError, match="set student.variant='base' student.img_size=224"):
        check_start(str(path), StudentConfig(variant="tiny", img_size=32, patch_size=16, out_dim=1024), S3Options())
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ValueError, match="not a torch weights file"):
        load_trained_student(str(tmp_path / "junk.pt"), S3Options())

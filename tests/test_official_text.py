"""A released UTA checkpoint's own text tower against the official code (tests/reference/uta_official,
unmodified): ``text_transformer()`` at the official shape and at a small one, random weights, loaded
into open_clip's ``TextTransformer`` (``uta_core.models.official_text``); and a whole official CLIP
(the UTA-B/16 image tower + a text tower) exported by ``pipelines/export.py`` to an open_clip folder
whose ``encode_image`` / ``encode_text`` / ``logit_scale`` are the official ``CLIP``'s."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from uta_core.models.official_text import build_official_text, official_text_config

sys.path.insert(0, str(Path(__file__).parent / "reference"))
with contextlib.redirect_stdout(io.StringIO()):  # it prints a hint when xformers is missing
    from uta_official import eva_vit as official_vit  # noqa: E402
    from uta_official.transformer import TextTransformer  # noqa: E402

PROMPTS = ["a photo of a dog.", "an origami crane on a wooden table", "a photo of the digit seven."]


def official_text(width: int, layers: int, heads: int, output_dim: int) -> TextTransformer:
    """The official ``text_transformer()`` settings (xattn) at any size, random weights; its attention
    on the explicit softmax path (no xformers on a CPU): the same arithmetic, the same parameters."""
    torch.manual_seed(0)
    tower = TextTransformer(width=width, layers=layers, heads=heads, output_dim=output_dim, xattn=True)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias") or "ln_" in name:  # zeros/ones would hide a mix-up
                p.add_(torch.randn_like(p) * 0.1)
    for block in tower.transformer.resblocks:
        block.attn.xattn = False
    return tower.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("width, layers, heads, output_dim", [(128, 2, 2, 32), (1024, 24, 16, 1024)],
                         ids=["small", "official-shape"])
def test_the_text_tower_equals_the_official_text_transformer(width, layers, heads, output_dim):
    tower = official_text(width, layers, heads, output_dim)
    state = tower.state_dict()
    cfg = official_text_config(state)
    assert cfg == {"embed_dim": output_dim, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width,
                                                         "heads": heads, "layers": layers, "mlp_ratio": 4.0}}
    ours = build_official_text(state)
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)  # the official script's tokenizer
    with torch.no_grad():
        assert rel(ours(tokens), tower(tokens)) < 1e-4
    del tower, ours


def test_a_released_checkpoint_exports_to_an_open_clip_clip_with_its_own_text_tower(tmp_path):
    from pipelines.lib.export.job import ExportConfig, run
    from uta_core.models.open_clip_export import load_open_clip

    with contextlib.redirect_stdout(io.StringIO()):
        visual = official_vit.eva_base_p16()  # UTA-B/16's tower (224 px, patch 16, 1024-d head)
    for block in visual.blocks:
        block.attn.xattn = False
    visual.eval()
    text = official_text(128, 2, 2, 1024)  # a small text tower into the same 1024-d space
    logit_scale = torch.tensor(float(np.log(1 / 0.07)))  # the official CLIP's initial value
    state = {**{f"visual.{k}": v for k, v in visual.state_dict().items()},
             **{f"text.{k}": v for k, v in text.state_dict().items()}, "logit_scale": logit_scale}
    torch.save(state, tmp_path / "UTA-B.pt")

    result = run(ExportConfig(model=str(tmp_path / "UTA-B.pt"), output=str(tmp_path / "export")))
    assert result["teacher"] == "the checkpoint's own"
    model, preprocess, tokenizer = load_open_clip(tmp_path / "export")
    assert type(model).__name__ == "CLIP"  # an ordinary open_clip CLIP
    images = torch.randn(2, 3, 224, 224)
    tokens = tokenizer(PROMPTS)
    with torch.no_grad():
        assert rel(model.encode_image(images), visual(images)) < 1e-4
        assert rel(model.encode_text(tokens), text(tokens)) < 1e-4
    assert float(model.logit_scale) == pytest.approx(float(logit_scale))
    assert preprocess.transforms[0].size == 224  # resize shortest side, centre crop, OpenAI mean/std
    assert list(preprocess.transforms[-1].mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])

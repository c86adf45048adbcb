"""A released UTA checkpoint's own text tower, as open_clip's ``TextTransformer``.

The official checkpoints hold a whole CLIP: ``text.*`` is ``eva_vit_model/transformer.py:
text_transformer()`` (width 1024, 24 layers, 16 heads, output 1024, 77 tokens, GELU, pre-norm,
causal mask, the EOT token's feature projected by ``text_projection``). Its parameter names are
open_clip's: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.<i>.{ln_1,
attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``,
``text_projection``; its attention (xformers' memory-efficient kernel with a lower-triangular
bias, or the explicit softmax path) computes what open_clip's ``nn.MultiheadAttention`` with the
causal mask computes. So the tower is an ordinary open_clip text tower: an export of a released
model is a plain open_clip ``CLIP`` (``text_cfg`` below, the keys at the top level) that
open_clip, clip_benchmark and ``evaluate.py`` load as any other.

The weights give every size but the head count; CLIP text towers use 64-wide heads (the
official 1024 / 16), which ``heads`` assumes unless told otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

HEAD_WIDTH = 64


def official_text_config(text_state: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, Any]:
    """open_clip's ``model_cfg`` minus the vision part (``embed_dim``, ``text_cfg``) of a ``text.*`` state."""
    try:
        vocab, width = text_state["token_embedding.weight"].shape
        context = text_state["positional_embedding"].shape[0]
        embed_dim = text_state["text_projection"].shape[1]
    except KeyError as err:
        raise ValueError(f"the checkpoint's text.* has no {err.args[0]}: not the official text tower") from None
    layers = 1 + max((int(m.group(1)) for k in text_state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))),
                     default=-1)
    mlp = text_state.get("transformer.resblocks.0.mlp.c_fc.weight")
    text_cfg = {"context_length": int(context), "vocab_size": int(vocab), "width": int(width),
                "heads": int(heads or max(1, width // HEAD_WIDTH)), "layers": int(layers),
                "mlp_ratio": float(mlp.shape[0] / width) if mlp is not None else 4.0}
    return {"embed_dim": int(embed_dim), "text_cfg": text_cfg}


def official_text_weights(text_state: dict[str, torch.Tensor], logit_scale: torch.Tensor | None) -> dict[str, Any]:
    """The tower's weights under an open_clip ``CLIP``'s names (the text keys at the top level) + ``logit_scale``."""
    weights = {k: v.detach().float().cpu().contiguous() for k, v in text_state.items() if k != "attn_mask"}
    if logit_scale is not None:
        weights["logit_scale"] = logit_scale.detach().float().cpu().reshape(())
    return weights


def build_official_text(text_state: dict[str, torch.Tensor], heads: int | None = None) -> torch.nn.Module:
    """open_clip's ``TextTransformer`` holding the checkpoint's text tower (every weight loaded, strict)."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = official_text_config(text_state, heads)
    tower = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]))
    tower.load_state_dict(official_text_weights(text_state, None), strict=True)
    return tower.eval()


def official_text_encoder(text_state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                          heads: int | None = None) -> Callable[[list[str]], torch.Tensor]:
    """texts -> the tower's embeddings (T, D), tokenised as the official script does."""
    tower = build_official_text(text_state, heads).to(device)
    tokenize = official_tokenizer(text_state)

    @torch.no_grad()
    def encode_text(texts: list[str]) -> torch.Tensor:
        return tower(tokenize(texts).to(device))

    return encode_text


def official_text_clip(text_state: dict[str, torch.Tensor], logit_scale: torch.Tensor | None = None,
                       heads: int | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` holding the checkpoint's text tower and ``logit_scale``, for UTA's stage 2
    (``uta_core.models.stage2`` replaces its image tower, a 1-layer placeholder, with the student)."""
    from open_clip.model import CLIP

    cfg = official_text_config(text_state, heads)
    placeholder = {"image_size": 32, "patch_size": 32, "width": 64, "layers": 1, "head_width": 64}
    model = CLIP(cfg["embed_dim"], vision_cfg=placeholder, text_cfg=cfg["text_cfg"])
    missing, unexpected = model.load_state_dict(official_text_weights(text_state, logit_scale), strict=False)
    unset = [k for k in missing if not k.startswith("visual.") and not (k == "logit_scale" and logit_scale is None)]
    if unexpected or unset:
        raise ValueError(f"the checkpoint's text.* does not fill open_clip's text tower: unexpected {unexpected[:3]}, "
                         f"unset {unset[:3]}")
    return model


def official_tokenizer(text_state: dict[str, torch.Tensor]) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's ``tokenize`` at the tower's context length (what the official script uses)."""
    import functools

    from open_clip.tokenizer import tokenize

    return functools.partial(tokenize, context_length=int(text_state["positional_embedding"].shape[0]))

"""The student as an open_clip CLIP: the student's image tower + the teacher's text tower.

Written into a student export folder (``uta_core.models.export``), next to timm's files, so the
one folder is both a timm ``local-dir:`` model and an open_clip ``local-dir:`` CLIP:

```
open_clip_config.json        model_cfg (vision: timm at this folder, CLS pooling, linear head
                             with bias; text: the teacher's) + preprocess_cfg (mean/std, size)
open_clip_model.safetensors  visual.trunk.* + visual.head.proj.* (the student) and the teacher's
                             text tower + logit_scale
```

``open_clip.create_model_and_transforms("local-dir:<folder>")`` then gives a CLIP whose
``encode_image`` is the student's CLS embedding and whose ``encode_text`` is the teacher's, so
open_clip and clip_benchmark run the student zero-shot as they run any CLIP.

open_clip hands no model arguments to timm, so the vision config names the folder itself
(``timm_model_name: "local-dir:<absolute path>"``) for timm to read ``config.json``. A copied or
downloaded folder is pointed at its new place with ``link_open_clip(folder)`` (what
``pipelines/export.py`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from uta_core.models.export import HEAD_WEIGHTS, UTA_CONFIG
from uta_core.models.teacher_weights import resolve_arch

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"


def teacher_model_config(arch: str) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) of a teacher arch."""
    if arch.startswith(LOCAL_DIR):
        return json.loads((Path(arch.removeprefix(LOCAL_DIR)) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    if arch.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(arch.removeprefix("hf-hub:"))["model_cfg"]
    cfg = open_clip.get_model_config(resolve_arch(arch))
    if cfg is None:
        raise ValueError(f"open_clip has no model config for teacher arch {arch!r}")
    return cfg


def _vision_cfg(folder: Path, image_size: int) -> dict[str, Any]:
    return {
        "timm_model_name": f"{LOCAL_DIR}{folder.resolve()}",
        "timm_model_pretrained": False,  # the weights are in open_clip_model.safetensors
        "timm_pool": "token",
        "timm_proj": "linear",
        "timm_proj_bias": True,
        "image_size": image_size,
    }


def write_open_clip(folder: str | Path, clip: nn.Module, arch: str, pretrained: str | None = None) -> Path:
    """Add the open_clip CLIP files to the student export in ``folder``.

    ``clip`` is the open_clip model whose text tower goes in (a teacher's ``model``, or stage 2's
    CLIP with its tuned text tower); ``arch`` names its open_clip config (``teacher.arch``)."""
    text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    model_cfg = {k: v for k, v in teacher_model_config(arch).items() if k != "vision_cfg"}
    return write_open_clip_files(folder, text, model_cfg, {"text_tower": arch, "text_pretrained": pretrained})


def write_open_clip_files(folder: str | Path, text: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                          provenance: dict[str, Any]) -> Path:
    """The open_clip files of the student export in ``folder`` with the text tower ``text`` (an open_clip
    CLIP's non-visual weights, ``logit_scale`` included) of config ``model_cfg`` (no ``vision_cfg``)."""
    folder = Path(folder)
    meta = json.loads((folder / "uta_student.json").read_text())
    if meta["out_dim"] != model_cfg["embed_dim"]:
        raise ValueError(f"the student embeds into {meta['out_dim']} dims but its text tower "
                         f"({provenance.get('text_tower')}) into {model_cfg['embed_dim']}")
    model_cfg = {**model_cfg, "vision_cfg": _vision_cfg(folder, meta["student"]["img_size"])}
    weights = {f"visual.trunk.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    weights |= {f"visual.head.proj.{k}": v for k, v in load_file(folder / "head.safetensors").items()}
    weights |= {k: v.detach().float().cpu().contiguous() for k, v in text.items()}
    save_file(weights, folder / OPEN_CLIP_WEIGHTS)
    size = meta["student"]["img_size"]
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": [size, size], "mode": "RGB", "mean": meta["mean"], "std": meta["std"],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "uta": provenance,
    }
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def link_open_clip(folder: str | Path) -> bool:
    """Point a copied/downloaded export's open_clip config at where the folder is now.

    Returns False when the folder has no open_clip files (nothing to link)."""
    folder = Path(folder)
    path = folder / OPEN_CLIP_CONFIG
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    vision = config["model_cfg"]["vision_cfg"]
    vision["timm_model_name"] = _vision_cfg(folder, vision["image_size"])["timm_model_name"]
    path.write_text(json.dumps(config, indent=2))
    return True


def load_open_clip(folder: str | Path, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` of the CLIP in ``folder``, exactly as open_clip users load it."""
    name = f"{LOCAL_DIR}{Path(folder).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def open_clip_visual(export_dir: str | Path):
    """The student as an open_clip image tower (``TimmModel``: trunk + linear head, CLS pooling).

    Its output is the student's CLS embedding in the teacher's joint space, so it can stand
    in for ``clip.visual`` next to the teacher's text tower.
    """
    from open_clip.timm_model import TimmModel

    src = Path(export_dir).resolve()
    meta = json.loads((src / UTA_CONFIG).read_text())
    tower = TimmModel(
        f"local-dir:{src}",
        embed_dim=meta["out_dim"],
        image_size=meta["student"]["img_size"],
        pool="token",
        proj="linear",
        proj_bias=True,
        pretrained=True,
    )
    tower.head.proj.load_state_dict(load_file(src / HEAD_WEIGHTS))
    return tower.eval()

"""Export a trained student so that plain timm (and our own loader) can use it.

An export is a folder in timm's local-dir layout plus our projection head:

```
config.json          timm: architecture + model_args (+ pretrained_cfg with mean/std)
model.safetensors    timm Eva trunk state dict (num_classes=0, CLS pooling)
head.safetensors     the UTA projection head: student width -> teacher joint space
uta_student.json     StudentConfig, teacher description, mean/std, the run's step
```

``timm.create_model("local-dir:<dir>", pretrained=True)`` rebuilds the trunk with its
weights; ``timm.create_model(architecture, **model_args)`` + ``load_state_dict`` also works.
``uta_core.models.trained.load_export(dir)`` rebuilds the whole ``UTAStudent`` (trunk + head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from uta_core.config import to_dict
from uta_core.models.student import TIMM_NAMES, StudentConfig, UTAStudent, eva_kwargs

TIMM_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
HEAD_WEIGHTS = "head.safetensors"
UTA_CONFIG = "uta_student.json"


def timm_architecture(cfg: StudentConfig) -> str:
    """A registered timm name; our ``nano``/``micro`` sizes are tiny's config with overrides."""
    return TIMM_NAMES.get(cfg.variant, TIMM_NAMES["tiny"])


def export_student(
    student: UTAStudent,
    out_dir: str | Path,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the export folder; ``extra`` (teacher, step, run name) goes into uta_student.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = student.cfg
    trunk_sd = {k: v.detach().cpu().contiguous() for k, v in student.trunk.state_dict().items()}
    save_file(trunk_sd, out / TIMM_WEIGHTS)
    head_sd = {k: v.detach().cpu().contiguous() for k, v in student.head.state_dict().items()}
    save_file(head_sd, out / HEAD_WEIGHTS)
    timm_cfg = {
        "architecture": timm_architecture(cfg),
        "num_classes": 0,
        "num_features": student.embed_dim,
        "global_pool": "token",
        "model_args": eva_kwargs(cfg),
        "pretrained_cfg": {
            "input_size": [3, cfg.img_size, cfg.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "classifier": "head",  # timm drops it when asked for another num_classes (fine-tuning)
        },
    }
    (out / TIMM_CONFIG).write_text(json.dumps(timm_cfg, indent=2))
    uta_cfg = {
        "student": to_dict(cfg),
        "out_dim": student.out_dim,
        "mean": list(mean),
        "std": list(std),
        **(extra or {}),
    }
    (out / UTA_CONFIG).write_text(json.dumps(uta_cfg, indent=2))
    return out

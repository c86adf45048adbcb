"""The student as an MLflow model: ``mlflow.pytorch.load_model`` / ``mlflow.pyfunc`` / the registry.

The logged module is ``ImageEmbedder``: pixels in [0, 1], (B, 3, S, S) float32 -> the student's
CLS embedding in the teacher's joint space, (B, E), as open_clip's ``encode_image`` gives it (not
normalised). It normalises with the teacher's mean/std itself, so callers need no preprocessing
beyond resizing to S. The model folder carries ``uta_core`` (``code_paths``), so it loads where
this project is not installed; its requirements are pinned to the versions that trained it.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uta_core.models.student import UTAStudent
from uta_core.models.trained import load_export

MODEL_NAME = "student_model"  # the MLflow model's name within its run
_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy")


class ImageEmbedder(nn.Module):
    """[0, 1] pixels (B, 3, S, S) -> CLS embedding (B, E)."""

    def __init__(self, student: UTAStudent, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.student = student.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels_B3SS: torch.Tensor) -> torch.Tensor:
        return self.student((pixels_B3SS - self.mean) / self.std)[:, 0]


def log_student_model(export_dir: str | Path, register_as: str | None = None) -> Any:
    """Log the export in ``export_dir`` as an MLflow model of the active run; returns MLflow's ModelInfo.

    ``register_as`` also registers it (a new version of that registered model)."""
    import mlflow

    student, meta = load_export(export_dir)
    model = ImageEmbedder(student, tuple(meta["mean"]), tuple(meta["std"])).eval()
    size = meta["student"]["img_size"]
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        signature = mlflow.models.infer_signature(example, model(torch.from_numpy(example)).numpy())
    run = mlflow.active_run()
    run_tags = mlflow.get_run(run.info.run_id).data.tags if run is not None else {}
    # "Logged from": the run's pipeline script, not the process's (Ray's default_worker.py).
    tags = {k: run_tags[k] for k in ("mlflow.source.name", "mlflow.source.type") if k in run_tags}
    return mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        input_example=example,
        signature=signature,
        code_paths=[str(Path(__file__).resolve().parents[1])],  # uta_core
        pip_requirements=[f"{name}=={version(name)}" for name in _REQUIREMENTS],
        registered_model_name=register_as,
        tags=tags or None,
    )

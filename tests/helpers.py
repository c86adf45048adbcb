"""Tiny random-init open_clip models for tests: built in milliseconds, no downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from uta_core.models.clip import tiny_clip_config as _library_tiny_config
from uta_core.models.teacher import Teacher
from uta_core.objectives.masking import MaskConfig, MaskGenerator

TINY_ARCH = "uta-test-tiny"


def tiny_clip_config(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, **vision: Any
) -> dict[str, Any]:
    """The library's tiny open_clip model config, with extra ``vision_cfg`` keys for refusal tests."""
    cfg = _library_tiny_config(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    cfg["vision_cfg"].update(vision)
    return cfg


def mask_gen(strategy: str, grid: tuple[int, int], mask_ratio: float, **options: Any) -> MaskGenerator:
    return MaskGenerator(MaskConfig(strategy=strategy, mask_ratio=mask_ratio, **options), grid)


def tiny_clip_model(seed: int = 0, **cfg: Any) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_clip_config(**cfg)).eval()


def tiny_clip_teacher(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, seed: int = 0
) -> Teacher:
    model = tiny_clip_model(seed, embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    return Teacher(model, arch=TINY_ARCH)


def write_model_config(directory: Path, name: str = TINY_ARCH, **cfg: Any) -> Path:
    """Write a tiny config as ``<directory>/<name>.json``; pass the path as a teacher arch.

    open_clip registers configs globally by name: give a config with other sizes its own name.
    """
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_config(**cfg)))
    return path


def write_clip_benchmark_dataset(root: Path, pixels_MHW3, labels_M, classnames, templates) -> Path:
    """Labelled images as a clip_benchmark ``wds/`` dataset (its own writer, ``convert_dataset``):
    ``<root>/test/*.tar`` + classnames.txt + zeroshot_classification_templates.txt (``{c}`` style)."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
    from PIL import Image

    class Labelled(list):
        pass

    data = Labelled((Image.fromarray(p.numpy()), int(y)) for p, y in zip(pixels_MHW3, labels_M))
    data.classes, data.templates = list(classnames), [t.replace("{}", "{c}") for t in templates]
    convert_dataset(data, "test", str(root), transform=PIL_to_bytes("png"), verbose=False)
    return root


# clip_benchmark 1.6.2 (the newest release) computes top-k accuracy with ``float()`` of a
# one-element 1-d array, which numpy >= 2.4 refuses (TypeError). Its CLI runs here unchanged
# but for that one function, replaced by the same sum written with ``.item()``.
_CLIP_BENCHMARK_CLI = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zc
def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
zc.accuracy = accuracy
from clip_benchmark.cli import main
sys.argv[0] = "clip_benchmark"
sys.exit(main())
"""


def run_clip_benchmark(model_dir: Path, dataset_root: Path, output: Path) -> dict:
    """``clip_benchmark eval`` (its CLI, in its own process) on a local-dir open_clip model."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _CLIP_BENCHMARK_CLI, "eval", "--model", f"local-dir:{model_dir}",
           "--pretrained", "none", "--dataset", "wds/uta", "--dataset_root", str(dataset_root),
           "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", "64",
           "--output", str(output), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text())["metrics"]

"""CLIP-loss training of an image tower and a text tower on image-caption shards (Ray Train).

    python pipelines/contrastive.py --smoke-test                       # tiny end-to-end run
    python pipelines/contrastive.py --config configs/contrastive_digits_teacher.yaml \\
        data.input.paths=outputs/digits/train run.storage_path=outputs/runs
    python pipelines/contrastive.py --config configs/contrastive_stage2.yaml \\
        model.student=outputs/runs/uta/export model.teacher.arch=ViT-B-16 model.teacher.pretrained=...

Two uses: ``model.init=scratch`` trains a small open_clip CLIP (the demo's teacher) and
writes it as ``<name>.json`` + ``<name>.pt`` for ``Teacher.from_open_clip``;
``model.init=uta_student`` is UTA's stage 2: the student export + the teacher's text tower,
fine-tuned with the temperature fixed at 0.01 (configs/contrastive_stage2.yaml).

Each Ray Train worker reads its own shards of each epoch (decoded by Ray tasks) and runs the
one training loop (``pipelines/lib/train/loop.py``, as pre-training: same exact resume,
checkpoints, MLflow run, export) with the contrastive task (``pipelines/lib/contrastive/task.py``). The
final model goes to ``<storage_path>/<run.name>/export``: ``<name>.json`` + ``<name>.pt``
(scratch) or a student export as pipelines/pretrain.py writes it + ``text.pt`` (stage 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cli import job_main
from pipelines.lib.contrastive.config import DEFAULT_CONFIG, ContrastiveJobConfig
from pipelines.lib.contrastive.job import REPORT_KEYS, run
from pipelines.lib.smoke import contrastive_overrides
from pipelines.lib.train.launch import print_report


def main(argv: list[str] | None = None) -> int:
    smoke = (contrastive_overrides, "train a tiny CLIP for a few steps on generated digits in a temp folder")
    return job_main(argv, "contrastive", __doc__, ContrastiveJobConfig, DEFAULT_CONFIG, "train.max_steps=300",
                    smoke=smoke, run=run, report=lambda result: print_report(result, REPORT_KEYS))


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot evaluation of a trained student, and the classifier file training uses.

    python pipelines/evaluate.py build-classifier teacher.arch=ViT-B-16 \\
        teacher.pretrained=laion2b_s34b_b88k classes=imagenet output=outputs/imagenet_classifier.pt
    python pipelines/evaluate.py zeroshot model=runs/uta-local/export \\
        input.paths='data/val/*.tar' classifier_path=outputs/imagenet_classifier.pt
    python pipelines/evaluate.py zeroshot model=runs/uta-local/export teacher.arch=ViT-B-16 \\
        teacher.pretrained=laion2b_s34b_b88k retrieval_input.paths='data/coco_val/*.tar'

``model`` is a student export folder (``export/`` of a run), a Ray Train checkpoint
folder of ``pipelines/pretrain.py`` (``checkpoint_*``, holding ``state.pt``), or a run
folder (its ``export/``), or a released UTA checkpoint file (``UTA-B/16``, ``L/14-336``,
``g/14-336`` from github jihaonew/UTA: its image tower and head); local or ``s3://``. The
classifier is the teacher's text tower
applied once to class names x templates (``build-classifier``), so a cache-mode run never
builds a teacher; ``zeroshot`` can also build it on the fly from ``teacher`` + ``classes``.
``retrieval_input`` (captioned shards) adds image->text and text->image recall@1/5/10; its
caption embeddings come from the classifier file when ``build-classifier`` was given the same
``retrieval_input``, else from the teacher. Results are printed as JSON and logged to MLflow
(metrics, and the recall as a ``retrieval.json`` table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cli import job_parser, print_result, run_job, setup_logging
from pipelines.lib.evaluate.job import EvaluateConfig, build_classifier_file, evaluate

COMMANDS = ("build-classifier", "zeroshot")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser(__doc__, None, None, "model=runs/x/export", EvaluateConfig, COMMANDS).parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    command = build_classifier_file if args.command == "build-classifier" else evaluate
    return run_job(EvaluateConfig, args, args.overrides, command, print_result)


if __name__ == "__main__":
    sys.exit(main())

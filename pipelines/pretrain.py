"""UTA pre-training on Ray Train: a student learns the frozen CLIP teacher's tokens.

    python pipelines/pretrain.py --smoke-test                          # tiny CPU run, generated data
    python pipelines/pretrain.py data.input.paths='data/*.tar'         # online teacher (as the paper)
    python pipelines/pretrain.py data.teacher_mode=cache data.cache=s3://b/cache s3.endpoint_url=...
    ray job submit --working-dir . -- python pipelines/pretrain.py --config my.yaml key=value

The driver resolves the config and, from metadata only, the run's teacher source
(``data.teacher_mode``: ``pipelines/lib/pretrain/targets.py``), its sources with their row
counts and the run's steps; then it fits a ``TorchTrainer`` whose workers run the one training
loop (``pipelines/lib/train/loop.py``) with the pre-training task
(``pipelines/lib/pretrain/task.py``). Each rank reads its own sources of each epoch in a seeded
order, decoded by Ray tasks. Rerunning the same ``run.name`` with the same ``run.storage_path``
resumes from the newest checkpoint: model, optimiser, schedule, MLflow run, and each rank's
place in its epoch, so the resumed epoch trains exactly the rows the stopped run had not.
``--help`` lists every config key; defaults: ``configs/pretrain_local.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cli import job_main
from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig
from pipelines.lib.pretrain.job import REPORT_KEYS, run
from pipelines.lib.smoke import pretrain_overrides
from pipelines.lib.train.launch import print_report


def main(argv: list[str] | None = None) -> int:
    smoke = (pretrain_overrides, "train a nano student for a few steps on generated digits with a tiny random teacher")
    return job_main(argv, "pretrain", __doc__, PretrainConfig, DEFAULT_CONFIG, "optim.lr=1e-3", smoke=smoke, run=run,
                    report=lambda result: print_report(result, REPORT_KEYS))


if __name__ == "__main__":
    sys.exit(main())

"""The paper's benchmark table through clip_benchmark: zero-shot classification and retrieval of one
model on a list of datasets, as one table (CSV + markdown) logged to MLflow.

    python pipelines/benchmark.py model=exports/uta-l datasets=[imagenet1k,cifar10,mscoco_captions,flickr30k] \\
        dataset_root='data/clip_benchmark/{dataset}' output=outputs/bench-uta-l
    python pipelines/benchmark.py model=UTA-L.pt datasets=[wds/imagenet1k] dataset_root='data/wds/{dataset}'

``model`` is an export folder of ``pipelines/export.py`` or anything it exports (a released UTA
checkpoint file with its own text tower, a run, a checkpoint). ``datasets`` are clip_benchmark's names
(``wds/<name>`` for its WebDataset format, whose ``dataset_type.txt`` says retrieval); ``dataset_root``
is its ``--dataset_root`` template. Each dataset runs ``clip_benchmark eval`` in its own process; with
numpy >= 2.4 the one clip_benchmark 1.6.2 function that trips on it is replaced in that process
(``clip_benchmark=<executable>`` runs another environment's, unchanged).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.benchmark.job import BenchmarkConfig, run
from pipelines.lib.cli import job_parser, print_result, run_job, setup_logging


def main(argv: list[str] | None = None) -> int:
    example = "model=exports/x datasets=[cifar10] output=outputs/bench-x"
    args = job_parser(__doc__, None, None, example, BenchmarkConfig).parse_intermixed_args(argv)
    setup_logging()
    return run_job(BenchmarkConfig, args, list(args.overrides), run, print_result)


if __name__ == "__main__":
    sys.exit(main())

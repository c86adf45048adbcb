"""Ray Tune sweep over pre-training configs (mask strategy x ratio, lr, ...), ASHA early stopping.

    python pipelines/sweep.py --space tune_spaces/masking.yaml data.cache=s3://bucket/cache
    python pipelines/sweep.py --smoke-test                      # 4 tiny trials on generated digits
    ray job submit --working-dir . -- python pipelines/sweep.py --space tune_spaces/masking.yaml ...

Each trial is a driver function that builds and fits the pre-training ``TorchTrainer``
(Train V2 + ``TuneReportCallback``). In cache mode every trial reads the same teacher
cache and no trial builds a teacher, so the teacher is paid for once per sweep. MLflow
gets one parent run for the sweep and a child run per trial; at the end the results table
(CSV) and a metric-vs-mask-ratio plot go to the parent. Rerunning the same ``--name``
resumes: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cli import job_parser, load_job_config, start_job, user_error
from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig
from pipelines.lib.smoke import sweep_overrides
from pipelines.lib.sweep.job import run_sweep

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, DEFAULT_CONFIG, "tune_spaces/smoke.yaml on generated digits", "optim.lr=1e-3",
                        PretrainConfig)
    parser.add_argument("--space", type=Path, default=ROOT / "tune_spaces" / "masking.yaml",
                        help="search space YAML (default: %(default)s)")
    parser.add_argument("--name", default="uta-sweep", help="sweep name; rerun the same name to resume")
    parser.add_argument("--storage-path", default="runs/sweeps", help="local folder or s3://bucket/prefix")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: the space's max_concurrent_trials, else what the cluster holds)")
    return parser.parse_intermixed_args(argv)


def run(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Run (or resume) the sweep; returns the results CSV."""
    return run_sweep(args, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def smoke_test(workdir: Path) -> list[str]:
        args.space = ROOT / "tune_spaces" / "smoke.yaml"
        args.storage_path = str(workdir / "sweeps")
        return sweep_overrides(workdir)

    try:
        overrides = start_job(args, smoke_test, "sweep")
        if args.print_config:  # the trials' base config
            return 0 if load_job_config(PretrainConfig, args, overrides) is None else 1
        csv = run(args, overrides)
    except ValueError as err:
        return user_error(err)
    print(f"results: {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

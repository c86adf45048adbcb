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
from pipelines.lib.sweep.job import run_sweep, space_overrides
from pipelines.lib.sweep.results import SweepOutcome
from pipelines.lib.sweep.search_space import SEED_KEY, SearchSpace, load_search_space, trial_label

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, DEFAULT_CONFIG, "tune_spaces/smoke.yaml on generated digits", "optim.lr=1e-3",
                        PretrainConfig)
    parser.add_argument("--space", type=Path, default=ROOT / "tune_spaces" / "masking.yaml",
                        help="search space YAML (default: %(default)s)")
    parser.add_argument("--name", default="uta-sweep", help="sweep name; rerun the same name to resume")
    parser.add_argument("--storage-path", default="runs/sweeps", help="local folder or s3://bucket/prefix")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per arm (run.seed 0..N-1), instead of the space's seeds")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: the space's max_concurrent_trials, else what the cluster holds)")
    return parser.parse_intermixed_args(argv)


def run(args: argparse.Namespace, overrides: list[str]) -> SweepOutcome:
    """Run (or resume) the sweep; returns where its results are and how many trials failed."""
    return run_sweep(args, overrides)


def describe_space(space: SearchSpace, path: Path) -> str:
    """``--print-config``'s head: what the space sweeps and the trials it expands to, as YAML comments."""
    lines = [f"# search space {path}: metric {space.metric} ({space.mode}), scheduler {space.scheduler.type}",
             f"# {space.num_trials} trials" + (f" ({space.num_samples} samples of each grid point)"
                                              if space.num_samples > 1 else "")]
    for key, spec in space.params.items():
        lines.append(f"#   {key}: {spec.kind} {list(spec.values)}")
    if space.has_seeds:
        arms = space.grid_size // len(space.params[SEED_KEY].values)
        base = space.baseline or "the first arm"
        lines.append(f"# {arms} arms x {len(space.params[SEED_KEY].values)} seeds; differences against {base}")
    if space.unique_labels:
        labels = [trial_label(point) for point in space.grid_points()]
        more = f", ... ({len(labels)} in all)" if len(labels) > 12 else ""
        lines.append("# trials: " + ", ".join(labels[:12]) + more)
    lines.append("# fixed: " + (", ".join(space.fixed_overrides()) or "nothing"))
    lines.append("# the trials' base config (the space's fixed keys and the command's overrides applied):")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def smoke_test(workdir: Path) -> list[str]:
        args.space = ROOT / "tune_spaces" / "smoke.yaml"
        args.storage_path = str(workdir / "sweeps")
        return sweep_overrides(workdir)

    try:
        overrides = start_job(args, smoke_test, "sweep")
        if args.print_config:  # the space, its trials, then the trials' base config with the space's fixed keys
            space = load_search_space(args.space, space_overrides(args))
            print(describe_space(space, args.space))
            return 0 if load_job_config(PretrainConfig, args, space.fixed_overrides() + overrides) is None else 1
        outcome = run(args, overrides)
    except ValueError as err:
        return user_error(err)
    print(f"results: {outcome.csv} (per arm: {outcome.csv.with_name('summary.md')})")
    print(outcome.last_line(args.name))
    return 0 if outcome.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())

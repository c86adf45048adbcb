"""Cache the frozen teacher's tokens for every image x view, so training never runs it again.

    python pipelines/cache_teacher.py --smoke-test                       # tiny end-to-end run
    python pipelines/cache_teacher.py input.paths='data/*.tar' output.path=s3://b/cache \\
        teacher.pretrained=laion2b_s34b_b88k s3.endpoint_url=http://minio:9000
    ray job submit --working-dir . -- python pipelines/cache_teacher.py --config my.yaml k=v

(Ray >= 2.59 clusters use token authentication: for ``ray job submit`` or a driver with
``RAY_ADDRESS`` set, export ``RAY_AUTH_MODE=token`` with the cluster's token in
``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``.)

Ray Data pipeline: pending input shards -> decode + V seeded views per image (CPU tasks)
-> teacher forward (GPU actors) -> one committed parquet per input shard + a manifest.
The job: ``pipelines/lib/cache/``; the Ray-free parts: ``uta_core/cache/``; the format:
docs/CACHE_FORMAT.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cache.config import DEFAULT_CONFIG, CacheConfig
from pipelines.lib.cache.job import ResourceError, check_destinations, execute, print_report
from pipelines.lib.cli import job_parser, start_job, user_error
from pipelines.lib.smoke import cache_overrides
from uta_core.cache.plan import plan_cache
from uta_core.config import load_config
from uta_core.data.storage import StorageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    smoke_help = "cache a few digits shards with a tiny random-init teacher in a temp folder"
    return job_parser(__doc__, DEFAULT_CONFIG, smoke_help, "output.token_codec=lowrank_int8").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = start_job(args, cache_overrides, "cache")
    try:  # user errors (config, paths, buckets, credentials, settings mismatch): one line, no trace
        cfg = load_config(CacheConfig, args.config, overrides)
        check_destinations(cfg)
        plan = plan_cache(cfg)
    except ValueError as err:
        return user_error(err)
    try:
        report = execute(plan)
    except (StorageError, ResourceError) as err:  # e.g. an output that is not writable
        return user_error(err)
    print_report(report)
    return 1 if report["incomplete"] or report["partial"] else 0


if __name__ == "__main__":
    sys.exit(main())

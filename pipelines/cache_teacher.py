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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cache.config import DEFAULT_CONFIG, CacheConfig
from pipelines.lib.cache.job import print_report, run
from pipelines.lib.cli import job_main
from pipelines.lib.smoke import cache_overrides


def main(argv: list[str] | None = None) -> int:
    smoke = (cache_overrides, "cache a few digits shards with a tiny random-init teacher in a temp folder")
    return job_main(argv, "cache", __doc__, CacheConfig, DEFAULT_CONFIG, "output.token_codec=lowrank_int8", smoke=smoke,
                    run=run, report=report)


def report(result: dict) -> int:
    print_report(result)
    return 1 if result["incomplete"] or result["partial"] else 0


if __name__ == "__main__":
    sys.exit(main())

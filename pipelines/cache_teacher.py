"""Cache the frozen teacher's tokens for every image x view, so training never runs it again.

    python pipelines/cache_teacher.py --smoke-test                       # tiny end-to-end run
    python pipelines/cache_teacher.py input.paths='data/*.tar' output.path=s3://b/cache \\
        teacher.pretrained=laion2b_s34b_b88k s3.endpoint_url=http://minio:9000
    ray job submit --working-dir . -- python pipelines/cache_teacher.py --config my.yaml k=v

(Ray >= 2.59 clusters use token authentication: for ``ray job submit`` or a driver with
``RAY_ADDRESS`` set, export ``RAY_AUTH_MODE=token`` with the cluster's token in
``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``.)

Ray Data pipeline: pending input shards -> decode + V seeded views per image (CPU tasks)
-> teacher forward (``map_batches`` with a callable class on an ``ActorPoolStrategy``,
one GPU per actor when the cluster has GPUs) -> the driver appends rows to one temporary
parquet per shard and commits each shard as soon as all its rows arrived. Format:
docs/CACHE_FORMAT.md; the Ray-free logic: ``uta_core/cache_job.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import ray

from pipelines.common import cluster_resources, init_ray, job_parser, start_job, user_error
from uta_core import tracking
from uta_core.cache_job import (
    CacheConfig,
    CachePlan,
    CacheResult,
    ShardCommitter,
    TokenEncoder,
    ViewTask,
    begin,
    plan_cache,
    shard_view_tables,
    summary,
)
from uta_core.config import load_config
from uta_core.shards import InputShard, digits_samples, webdataset_bytes
from uta_core.storage import StorageError

log = logging.getLogger("uta.cache")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cache_teacher_local.yaml"


# --------------------------------------------------------------------- the Ray pipeline
class ResourceError(ValueError):
    """The cluster cannot run the job as configured (no GPU, too few CPUs)."""


def _views_of_shards(batch: pa.Table, task: ViewTask) -> Iterator[pa.Table]:
    for item in batch.to_pylist():
        yield from shard_view_tables(task, item["name"], InputShard(**json.loads(item["shard"])))


def compute_resources(cfg: CacheConfig) -> tuple[str, int, float, int]:
    """(device, number of teacher actors, CPUs per actor, torch threads per actor)."""
    cpus, gpus = cluster_resources()
    device = cfg.ray.device
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise ResourceError("ray.device=cuda but the Ray cluster has no GPU; use ray.device=auto or cpu")
    num_actors = cfg.ray.num_actors or (int(gpus) if device == "cuda" else 1)
    actor_cpus = cfg.ray.actor_num_cpus
    if actor_cpus is None:
        # On CPU the teacher gets half the cores; the decode/view tasks keep the rest, so the
        # actor pool can never starve them (a full pool hangs the pipeline at 0 rows).
        actor_cpus = 1.0 if device == "cuda" else max(0.5, (cpus / 2 - 0.5) / num_actors)
    if actor_cpus * num_actors + cfg.ray.read_num_cpus > cpus:
        raise ResourceError(
            f"{num_actors} teacher actors x {actor_cpus} CPUs + one {cfg.ray.read_num_cpus}-CPU read task "
            f"exceed the cluster's {cpus:g} CPUs; lower ray.num_actors or ray.actor_num_cpus"
        )
    threads = cfg.ray.actor_threads
    if threads is None:
        # A CPU teacher costs ~30x the decoding + view sampling of an image, so its threads
        # may use every core even though Ray reserves only a fraction of them for it.
        threads = max(1, int(actor_cpus)) if device == "cuda" else max(1, (os.cpu_count() or 1) // num_actors)
    return device, num_actors, actor_cpus, threads


def build_dataset(plan: CachePlan, device: str, num_actors: int, actor_cpus: float, threads: int) -> ray.data.Dataset:
    cfg = plan.cfg
    items = [{"name": name, "shard": json.dumps(dataclasses.asdict(shard))} for name, shard in plan.pending.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per shard
    ds = ds.map_batches(
        _views_of_shards, fn_kwargs={"task": ViewTask.from_plan(plan)},
        batch_size=1, batch_format="pyarrow", num_cpus=cfg.ray.read_num_cpus,
    )
    return ds.map_batches(
        TokenEncoder,
        fn_constructor_args=(cfg,),
        fn_constructor_kwargs={
            "device": device, "fingerprint": plan.manifest.settings.teacher["fingerprint"],
            "num_threads": threads,
        },
        batch_size=cfg.ray.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_cpus=actor_cpus, num_gpus=1 if device == "cuda" else None,
    )


def execute(plan: CachePlan) -> dict:
    """Run a validated plan on Ray; returns the run report (see ``print_report``)."""
    cfg = plan.cfg
    started_ray = init_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        device, num_actors, actor_cpus, threads = compute_resources(cfg)
        compute = f"{device} {plan.manifest.settings.teacher['precision'] if device == 'cuda' else 'fp32'}"
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        with tracking.start_run(cfg.tracking, "uta-cache", tags={"job": "cache_teacher"}):
            tracking.log_config(cfg)
            begin(plan)
            log.info("%s: %d shards to do (%d redone), %d already committed; %s, %d actor(s) x %g CPU, "
                     "%d threads", plan.root_uri, len(plan.pending), len(plan.redo), len(plan.done), compute,
                     num_actors, actor_cpus, threads)
            start = time.perf_counter()
            result = CacheResult()
            if plan.pending:
                committer = ShardCommitter(plan, compute=compute)
                try:
                    ds = build_dataset(plan, device, num_actors, actor_cpus, threads)
                    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                        committer.add(table)
                except BaseException:
                    committer.abort()
                    raise
                result = committer.finish()
            stats = summary(result, time.perf_counter() - start)
            tracking.log_metrics({k: v for k, v in stats.items() if not math.isnan(v)})
            tracking.log_json(json.loads(plan.manifest.to_json()), "manifest.json")
    finally:
        if started_ray:
            ray.shutdown()
    return {"output": plan.root_uri, "summary": stats, "committed": result.committed,
            "incomplete": result.incomplete, "already_done": plan.done, "redone": plan.redo}


def run(cfg: CacheConfig) -> dict:
    return execute(plan_cache(cfg))


# --------------------------------------------------------------------- command line
def print_report(report: dict) -> None:
    s = report["summary"]
    rows = [
        ("output", report["output"]),
        ("shards committed / already done / incomplete",
         f"{len(report['committed'])} / {len(report['already_done'])} / {len(report['incomplete'])}"),
        ("images", f"{s['images']:,}"), ("views", f"{s['views']:,}"), ("skipped", f"{s['skipped']:,}"),
        ("images/s", f"{s['images_per_s']:.1f}"), ("bytes written", f"{s['bytes_written']:,}"),
        ("bytes per view", f"{s['bytes_per_view']:,.0f}" if s["views"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["incomplete"]:
        print(f"incomplete shards (rerun to redo them): {', '.join(report['incomplete'])}")


SMOKE_TEACHER = {  # a random-init ViT small enough for a CPU: 32 px, patch 4 -> 8x8 grid
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def smoke_overrides(workdir: Path, shards: int = 2, per_shard: int = 12) -> list[str]:
    """Write digits WebDataset shards + a tiny teacher config into ``workdir``; return overrides."""
    (workdir / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        samples = digits_samples(per_shard, size=32, offset=i * per_shard)
        (workdir / "shards" / f"{i:05d}.tar").write_bytes(webdataset_bytes(samples))
    arch = workdir / "uta-smoke-tiny.json"
    arch.write_text(json.dumps(SMOKE_TEACHER))
    return [
        f"input.paths={workdir / 'shards'}", f"output.path={workdir / 'cache'}",
        f"teacher.arch={arch}", "teacher.pretrained=null", "teacher.precision=fp32", "teacher_random_seed=0",
        "views.size=32", "num_views=2", f"ray.num_cpus={min(2, os.cpu_count() or 1)}", "ray.batch_size=32",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    smoke_help = "cache a few digits shards with a tiny random-init teacher in a temp folder"
    return job_parser(__doc__, DEFAULT_CONFIG, smoke_help, "output.token_dtype=int8").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = start_job(args, smoke_overrides, "cache")
    try:  # user errors (config, paths, buckets, credentials, settings mismatch): one line, no trace
        cfg = load_config(CacheConfig, args.config, overrides)
        plan = plan_cache(cfg)
    except ValueError as err:
        return user_error(err)
    try:
        report = execute(plan)
    except (StorageError, ResourceError) as err:  # e.g. an output that is not writable
        return user_error(err)
    print_report(report)
    return 1 if report["incomplete"] else 0


if __name__ == "__main__":
    sys.exit(main())

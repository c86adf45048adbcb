"""The caching job on Ray Data: pending input shards -> views (CPU tasks) -> teacher (actors) -> commit.

``map_batches`` with a callable class on an ``ActorPoolStrategy`` runs the teacher, one GPU
per actor when the cluster has GPUs; the driver appends rows to one temporary parquet per
shard and commits each shard as soon as all its rows arrived (``uta_core.cache.commit``).
Format: docs/CACHE_FORMAT.md; the data flow: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator

import pyarrow as pa
import ray

from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.progress import DriverProgress
from pipelines.lib.ray_setup import cluster_resources, init_ray
from uta_core import tracking
from uta_core.cache.commit import CacheResult, ShardCommitter, summary
from uta_core.cache.plan import CachePlan, plan_cache, prepare_output
from uta_core.cache.rows import TokenEncoder, ViewTask, shard_view_tables
from uta_core.data.shards import InputShard

log = logging.getLogger("uta.cache")


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
        _views_of_shards, fn_kwargs={"task": ViewTask.from_plan(plan, cfg.ray.images_per_block)},
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
        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar of ours instead (below)
        run_name = cfg.tracking.run_name or f"cache-{plan.root_uri.rstrip('/').rsplit('/', 1)[-1]}"
        with tracking.start_run(cfg.tracking, "uta-cache", run_name=run_name, tags={"job": "cache_teacher"},
                                source="pipelines/cache_teacher.py") as mlrun:
            tracking.log_config(cfg)
            prepare_output(plan)
            log.info("%s: %d shards to do (%d redone), %d already committed; %s, %d actor(s) x %g CPU, "
                     "%d threads", plan.root_uri, len(plan.pending), len(plan.redo), len(plan.done), compute,
                     num_actors, actor_cpus, threads)
            start = time.perf_counter()
            result = CacheResult()
            if plan.pending:
                committer = ShardCommitter(plan, compute=compute)
                try:
                    ds = build_dataset(plan, device, num_actors, actor_cpus, threads)
                    views = 0
                    progress = (DriverProgress("caching", len(plan.pending), unit="shard", remote=False)
                                if cfg.ray.progress_bars else contextlib.nullcontext())
                    with progress as bar:
                        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                            committer.add(table)
                            views += table.num_rows
                            if bar is not None:
                                bar.set(len(committer.result.committed), note=f"{views:,} views")
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
            "incomplete": result.incomplete, "partial": result.partial, "already_done": plan.done,
            "redone": plan.redo, "mlflow_run_id": mlrun.info.run_id if mlrun is not None else None,
            "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}


def check_destinations(cfg: CacheConfig) -> None:
    """Before planning: the cache and the MLflow store are places the job may write and keep."""
    check_output("output.path", cfg.output.path)
    check_tracking(cfg.tracking)


def run(cfg: CacheConfig) -> dict:
    """Plan and run the caching job; returns its report (``print_report``)."""
    check_destinations(cfg)
    return execute(plan_cache(cfg))


def print_report(report: dict) -> None:
    s = report["summary"]
    rows = [
        ("output", report["output"]),
        ("shards committed / already done / incomplete",
         f"{len(report['committed'])} / {len(report['already_done'])} / {len(report['incomplete'])}"),
        ("shards read partially (broken input)", str(len(report["partial"]))),
        ("images", f"{s['images']:,}"), ("views", f"{s['views']:,}"), ("skipped", f"{s['skipped']:,}"),
        ("images/s", f"{s['images_per_s']:.1f}"), ("bytes written", f"{s['bytes_written']:,}"),
        ("bytes per view", f"{s['bytes_per_view']:,.0f}" if s["views"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["incomplete"]:
        print(f"incomplete shards (rerun to redo them): {', '.join(report['incomplete'])}")
    if report["partial"]:
        print(f"shards whose input broke part-way (committed with the rows read; the manifest records the "
              f"error; a rerun reads them again): {', '.join(report['partial'])}")
    if report.get("mlflow_run_id"):
        print(tracking.where_runs_are(report["tracking_uri"], report["mlflow_run_id"]))

"""The caching job on Ray Data: pending input shards -> views (CPU tasks) -> teacher (actors)
-> part files (CPU write tasks) -> commit (driver, metadata only).

``map_batches`` with a callable class on an ``ActorPoolStrategy`` runs the teacher, one GPU
per actor (the pool grows from one actor as the autoscaler adds GPUs, ``gpu_pool``); write
tasks put each shard's rows of a batch into a part file on the output storage and hand on
one metadata row per part; the driver records a shard in the manifest once its parts hold
all its rows (``uta_core.cache.commit``). No pixel or token byte reaches the driver.
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
from pipelines.lib.ray_setup import (
    await_gpus,
    cluster_resources,
    connected_to_cluster,
    init_ray,
    release_resource_request,
)
from uta_core import tracking
from uta_core.cache.codecs import TokenCodec
from uta_core.cache.commit import CacheResult, ShardCommitter, summary
from uta_core.cache.plan import CachePlan, plan_cache, prepare_output
from uta_core.cache.verify import mismatched_parts
from uta_core.cache.writer import PartWriter, TokenEncoder, ViewTask, cache_codec, fit_cache_basis, shard_view_tables
from uta_core.data.shards import InputShard
from uta_core.datasets import OUTPUT, TRAINING, digest_of, log_dataset
from uta_core.lease import Lease

log = logging.getLogger("uta.cache")


class ResourceError(ValueError):
    """The cluster cannot run the job as configured (no GPU, too few CPUs)."""


def _views_of_shards(batch: pa.Table, task: ViewTask) -> Iterator[pa.Table]:
    for item in batch.to_pylist():
        yield from shard_view_tables(task, item["name"], InputShard(**json.loads(item["shard"])))


def _write_parts(batch: pa.Table, writer: PartWriter) -> pa.Table:
    return writer(batch)


def resolve_device(cfg: CacheConfig) -> str:
    """``ray.device``: ``auto`` is the GPU when the cluster has one now, else the CPU, said loudly on a
    cluster the job joined (its GPU nodes may only be scaled from zero: ``cuda`` waits for them)."""
    if cfg.ray.device != "auto":
        return cfg.ray.device
    if cluster_resources()[1] >= 1:
        return "cuda"
    if connected_to_cluster(cfg.ray.address):
        log.warning("ray.device=auto: the Ray cluster has no GPU now, so the teacher runs on CPUs. On a cluster "
                    "that scales GPU nodes from zero, set ray.device=cuda: the job then asks the autoscaler for "
                    "them and waits")
    return "cpu"


def compute_resources(cfg: CacheConfig, device: str) -> tuple[int, float, int]:
    """(number of teacher actors, CPUs per actor, torch threads per actor) on ``device``.

    On GPUs the pool is ``ray.num_actors`` (default: the GPUs the cluster has once it has
    any); Ray Data grows it from one actor as the autoscaler adds GPUs. On CPUs it must fit
    the cluster now, with room left for the read and write tasks.
    """
    cpus, gpus = cluster_resources()
    if device == "cuda":
        num_actors = cfg.ray.num_actors or max(1, int(gpus))
        actor_cpus = cfg.ray.actor_num_cpus or 1.0
        return num_actors, actor_cpus, cfg.ray.actor_threads or max(1, int(actor_cpus))
    num_actors = cfg.ray.num_actors or 1
    actor_cpus = cfg.ray.actor_num_cpus
    if actor_cpus is None:
        # On CPU the teacher gets half the cores; the decode/view tasks keep the rest, so the
        # actor pool can never starve them (a full pool hangs the pipeline at 0 rows).
        actor_cpus = max(0.5, (cpus / 2 - 0.5) / num_actors)
    if actor_cpus * num_actors + cfg.ray.read_num_cpus + cfg.ray.write_num_cpus > cpus:
        raise ResourceError(
            f"{num_actors} teacher actors x {actor_cpus} CPUs + one {cfg.ray.read_num_cpus}-CPU read task + one "
            f"{cfg.ray.write_num_cpus}-CPU write task exceed the cluster's {cpus:g} CPUs; lower ray.num_actors "
            "or ray.actor_num_cpus"
        )
    # A CPU teacher costs ~30x the decoding + view sampling of an image, so its threads
    # may use every core even though Ray reserves only a fraction of them for it.
    threads = cfg.ray.actor_threads or max(1, (os.cpu_count() or 1) // num_actors)
    return num_actors, actor_cpus, threads


def gpu_pool(cfg: CacheConfig) -> tuple[int, float, int]:
    """Ask the autoscaler for the pool's GPUs, wait for the first, then size the pool again (with
    ``ray.num_actors`` unset, the pool is the GPUs the cluster has by then)."""
    num_actors, actor_cpus, _ = compute_resources(cfg, "cuda")
    try:
        await_gpus([{"GPU": 1.0, "CPU": actor_cpus}] * num_actors, cfg.ray.gpu_wait_s, "teacher actors")
    except TimeoutError as err:
        raise ResourceError(str(err)) from None
    return compute_resources(cfg, "cuda")


def rows_per_part(plan: CachePlan, codec: TokenCodec) -> int:
    """Rows a write task gathers into its part files: ~``output.part_mb`` of tokens + pixels."""
    cfg = plan.cfg
    pixel_bytes = cfg.views.size ** 2 * 3 * {"png": 0.6, "jpeg": 0.15, "none": 0.0}[cfg.output.pixel_format]
    return max(1, int(cfg.output.part_mb * 2**20 // (codec.bytes_per_view + pixel_bytes)))


def build_dataset(plan: CachePlan, codec: TokenCodec, device: str, num_actors: int, actor_cpus: float,
                  threads: int) -> ray.data.Dataset:
    cfg = plan.cfg
    items = [{"name": name, "shard": json.dumps(dataclasses.asdict(shard))} for name, shard in plan.pending.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per shard
    ds = ds.map_batches(
        _views_of_shards, fn_kwargs={"task": ViewTask.from_plan(plan, cfg.ray.images_per_block)},
        batch_size=1, batch_format="pyarrow", num_cpus=cfg.ray.read_num_cpus,
    )
    ds = ds.map_batches(
        TokenEncoder,
        fn_constructor_args=(cfg, codec),
        fn_constructor_kwargs={
            "device": device, "fingerprint": plan.manifest.settings.teacher["fingerprint"],
            "num_threads": threads,
        },
        batch_size=cfg.ray.batch_size or (256 if device == "cuda" else 64), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_cpus=actor_cpus, num_gpus=1 if device == "cuda" else None, resources=cfg.ray.actor_resources or None,
    )
    writer = PartWriter(root_uri=cfg.output.path, s3=cfg.s3, settings=plan.manifest.settings,
                        bytes_per_view=codec.bytes_per_view, compression=cfg.output.compression,
                        token_compression=cfg.output.token_compression, row_group_mb=cfg.output.row_group_mb,
                        fence=plan.out.fence)
    return ds.map_batches(_write_parts, fn_kwargs={"writer": writer}, batch_size=rows_per_part(plan, codec),
                          batch_format="pyarrow", num_cpus=cfg.ray.write_num_cpus)


def prepare_codec(plan: CachePlan, device: str, actor_cpus: float, threads: int) -> TokenCodec:
    """The cache's codec; lowrank_int8 fits its basis once, on a teacher worker (resumes reuse it)."""
    fit = ray.remote(fit_cache_basis).options(num_cpus=actor_cpus, num_gpus=1 if device == "cuda" else 0,
                                              resources=plan.cfg.ray.actor_resources)
    return cache_codec(plan, lambda *args: ray.get(fit.remote(*args, device=device, num_threads=threads)))


def execute(plan: CachePlan) -> dict:
    """Run a validated plan on Ray; returns the run report (see ``print_report``)."""
    cfg = plan.cfg
    # a new local Ray offers the actors' custom resources (one node plays every group)
    wanted = {k: v * (cfg.ray.num_actors or 1) for k, v in cfg.ray.actor_resources.items()} or None
    started_ray = init_ray(cfg.ray.address, cfg.ray.num_cpus, wanted, cpus_setting="ray.num_cpus")
    device = None
    try:
        device = resolve_device(cfg)
        num_actors, actor_cpus, threads = gpu_pool(cfg) if device == "cuda" else compute_resources(cfg, device)
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
                codec = prepare_codec(plan, device, actor_cpus, threads)
                committer = ShardCommitter(plan, compute=compute, save_every_s=cfg.output.manifest_interval_s)
                try:
                    ds = build_dataset(plan, codec, device, num_actors, actor_cpus, threads)
                    views = 0
                    progress = (DriverProgress("caching", len(plan.pending), unit="shard", remote=False)
                                if cfg.ray.progress_bars else contextlib.nullcontext())
                    cpu_start = time.process_time()  # the driver process, all its threads
                    with progress as bar:
                        for parts in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                            committer.add(parts)  # metadata of written part files
                            views += sum(parts.column("rows").to_pylist())
                            if bar is not None:
                                bar.set(len(committer.result.committed), note=f"{views:,} views")
                except BaseException as err:
                    committer.abort(err)
                    raise
                result = committer.finish()
                result.driver_cpu_s = time.process_time() - cpu_start
            stats = summary(result, time.perf_counter() - start)
            tracking.log_metrics({k: v for k, v in stats.items() if not math.isnan(v)})
            tracking.log_json(json.loads(plan.manifest.to_json()), "manifest.json")
            if mlrun is not None:
                log_cache_datasets(plan)
    finally:
        if device == "cuda":
            release_resource_request()
        if started_ray:
            ray.shutdown()
    return {"output": plan.root_uri, "summary": stats, "committed": result.committed,
            "incomplete": result.incomplete, "partial": result.partial, "already_done": plan.done,
            "kept": plan.kept,
            "redone": plan.redo, "mlflow_run_id": mlrun.info.run_id if mlrun is not None else None,
            "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}


def log_cache_datasets(plan: CachePlan) -> None:
    """The input shards (context training: what the teacher ran on) and the cache (context output) as MLflow
    datasets; the cache's digest is its settings and its committed shards with their rows."""
    shards = plan.inputs.shards
    log_dataset("input shards", list(plan.cfg.input.paths), digest_of([s.uri for s in shards]), TRAINING,
                sources=len(shards))
    manifest = plan.manifest
    committed = sorted((name, rec.rows) for name, rec in manifest.shards.items())
    log_dataset("teacher cache", plan.root_uri, digest_of(manifest.settings.hash(), committed), OUTPUT,
                shards=len(committed), rows=sum(rows for _, rows in committed), settings_hash=manifest.settings.hash())


def check_destinations(cfg: CacheConfig) -> None:
    """Before planning: the cache and the MLflow store are places the job may write and keep."""
    check_output("output.path", cfg.output.path)
    check_tracking(cfg.tracking)


def run(cfg: CacheConfig) -> dict:
    """Plan and run the caching job; returns its report (``print_report``)."""
    check_destinations(cfg)
    with Lease(cfg.output.path, cfg.s3, "output.path", cfg.output.lease).held() as lease:  # one job at a time
        verifying = cfg.output.verify  # verify's tasks run on Ray
        started = init_ray(cfg.ray.address, cfg.ray.num_cpus, cpus_setting="ray.num_cpus") if verifying else False
        try:
            return execute(plan_cache(cfg, verify_with=verify_on_ray, lease=lease))
        finally:
            if started:
                ray.shutdown()


def verify_on_ray(uri: str, parts: list[tuple[str, str]], s3) -> list[str]:
    """``output.verify``: the committed parts' sha256, 8 parts a Ray task (the bytes never reach the driver)."""
    task = ray.remote(num_cpus=1)(mismatched_parts)
    chunks = [parts[i:i + 8] for i in range(0, len(parts), 8)]
    log.info("%s: verifying the sha256 of %d committed part(s) (output.verify)", uri, len(parts))
    return [path for bad in ray.get([task.remote(uri, chunk, s3) for chunk in chunks]) for path in bad]


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
        ("duplicate parts dropped (retried tasks)", str(s["duplicate_parts"])),
        ("driver CPU (Ray Data's scheduling)",
         f"{s['driver_cpu_ms_per_view'] * s['views'] / 1e3:.1f} s = {s['driver_cpu_ms_per_view']:.2f} ms per view"
         if s["views"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["incomplete"]:
        print(f"incomplete shards (rerun to redo them): {', '.join(report['incomplete'])}")
    if report["kept"]:
        print(f"kept {len(report['kept'])} committed shard(s) not in today's inputs (the cache still holds them): "
              f"{', '.join(report['kept'][:10])}{', ...' if len(report['kept']) > 10 else ''}")
    if report["partial"]:
        print(f"shards whose input broke part-way (committed with the rows read; the manifest records the "
              f"error; a rerun reads them again): {', '.join(report['partial'])}")
    if report.get("mlflow_run_id"):
        print(tracking.where_runs_are(report["tracking_uri"], report["mlflow_run_id"]))

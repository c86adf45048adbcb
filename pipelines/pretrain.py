"""UTA pre-training on Ray Train: a student learns the frozen CLIP teacher's tokens.

    python pipelines/pretrain.py --smoke-test                          # tiny CPU run, generated data
    python pipelines/pretrain.py data.input.paths='data/*.tar'         # online teacher (as the paper)
    python pipelines/pretrain.py data.teacher_mode=cache data.cache=s3://b/cache s3.endpoint_url=...
    ray job submit --working-dir . -- python pipelines/pretrain.py --config my.yaml key=value

The driver resolves the config, builds the Ray Data pipeline (raw shards -> decoded views,
or cache parquet -> decoded views + stored tokens), computes the run's steps from the row
count, and fits a ``TorchTrainer`` whose workers run ``pipelines/train_loop.py``.
Rerunning the same ``run.name`` with the same ``run.storage_path`` resumes from the last
checkpoint (model, optimiser, scheduler, step, MLflow run, and the data position as far as
Ray allows: the epoch and how many micro-batches each rank had consumed, which are skipped;
``streaming_split`` hands out blocks dynamically, so *which* rows those were is not replayed).
Config defaults: ``configs/pretrain_local.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import open_clip
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipelines.common import init_ray, job_parser, run_training_job, start_job
from pipelines.train_loop import TRAIN_DATASET, LoopPlan, train_loop_per_worker
from uta_core import tracking
from uta_core.cache_format import open_cache
from uta_core.config import from_dict, to_dict
from uta_core.pretrain_config import PretrainConfig
from uta_core.shards import InputShard, discover
from uta_core.storage import S3_SCHEME, filesystem_for, is_s3, join, s3_filesystem, write_bytes_atomic
from uta_core.teacher import resolve_arch
from uta_core.train_data import cache_rows, count_images, online_rows

log = logging.getLogger("uta.pretrain")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain_local.yaml"
CACHE_COLUMNS = ["key", "view", "pixels", "tokens", "label"]


# --------------------------------------------------------------------- config
def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Make what workers must agree on absolute: local storage path, MLflow URI."""
    run = cfg.run
    if not is_s3(run.storage_path):
        run = dataclasses.replace(run, storage_path=str(Path(run.storage_path).expanduser().resolve()))
    trk = dataclasses.replace(cfg.tracking, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    return dataclasses.replace(cfg, run=run, tracking=trk)


def run_uri(cfg: PretrainConfig) -> str:
    return join(cfg.run.storage_path, cfg.run.name)


def precheck_teacher(cfg: PretrainConfig) -> None:
    """Online mode: compare grid and embed dim with the teacher's open_clip config before any worker starts."""
    arch = cfg.teacher.arch
    if arch.startswith(("hf-hub:", "local-dir:")):
        return  # known only once built; the workers check it
    spec = open_clip.get_model_config(resolve_arch(arch))
    vision = spec["vision_cfg"]
    patch = vision.get("patch_size")
    if isinstance(patch, int) and cfg.student.img_size % patch:
        raise ValueError(
            f"the teacher ({arch}, patch {patch}) runs on the student's {cfg.student.img_size} px views, "
            f"which is not a multiple of {patch}; set student.img_size to a multiple of {patch}"
        )
    if isinstance(patch, int) and cfg.student.img_size // patch != cfg.student.grid[0]:
        side = cfg.student.img_size // patch
        raise ValueError(
            f"student grid {cfg.student.grid[0]}x{cfg.student.grid[1]} (patch {cfg.student.patch_size}) != teacher "
            f"grid {side}x{side} ({arch}, patch {patch} at {cfg.student.img_size} px); set student.patch_size={patch}"
        )
    if spec["embed_dim"] != cfg.student.out_dim:
        raise ValueError(f"student.out_dim={cfg.student.out_dim} but {arch} embeds into {spec['embed_dim']} dims; "
                         f"set student.out_dim={spec['embed_dim']}")


# --------------------------------------------------------------------- datasets
def _online_block(batch: dict, cfg_dict: dict):
    cfg = from_dict(PretrainConfig, cfg_dict)
    for item in batch["shard"]:
        shard = InputShard(**json.loads(item))
        yield from online_rows(shard, cfg.data.input, cfg.data.views, cfg.data.num_views, cfg.s3)


def _count_block(batch: dict, cfg_dict: dict) -> dict:
    cfg = from_dict(PretrainConfig, cfg_dict)
    return {"n": [count_images(InputShard(**json.loads(item)), cfg.data.input, cfg.s3) for item in batch["shard"]]}


def online_dataset(cfg: PretrainConfig) -> tuple[ray.data.Dataset, int]:
    """Raw shards -> decoded, seeded views (CPU tasks); returns the dataset and its row count."""
    precheck_teacher(cfg)
    inputs = discover(cfg.data.input, cfg.s3)
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in inputs.shards]
    cfg_dict = to_dict(cfg)
    shards = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per shard
    counts = shards.map_batches(_count_block, fn_kwargs={"cfg_dict": cfg_dict}, batch_size=1, batch_format="numpy")
    rows = sum(int(r["n"]) for r in counts.take_all()) * cfg.data.num_views
    if cfg.data.shuffle_files:
        shards = shards.randomize_block_order()
    ds = shards.map_batches(_online_block, fn_kwargs={"cfg_dict": cfg_dict}, batch_size=1, batch_format="numpy")
    return ds, rows


def check_cache(manifest, cfg: PretrainConfig, uri: str) -> None:
    """Refuse a cache whose tokens or views do not fit the configured student."""
    s = manifest.settings
    if tuple(s.grid) != cfg.student.grid:
        raise ValueError(
            f"{uri} holds teacher tokens on a {s.grid[0]}x{s.grid[1]} grid but the student's grid is "
            f"{cfg.student.grid[0]}x{cfg.student.grid[1]} (img_size {cfg.student.img_size}, patch "
            f"{cfg.student.patch_size}); set student.patch_size={s.views['size'] // s.grid[0]} or rebuild the cache"
        )
    if s.token_shape[1] != cfg.student.out_dim:
        raise ValueError(f"{uri} holds {s.token_shape[1]}-dim teacher tokens but student.out_dim="
                         f"{cfg.student.out_dim}; set student.out_dim={s.token_shape[1]}")
    if s.views["size"] != cfg.student.img_size:
        raise ValueError(f"{uri} holds {s.views['size']} px views but student.img_size={cfg.student.img_size}; "
                         f"set student.img_size={s.views['size']}")
    if not manifest.shards:
        raise ValueError(f"{uri} has no committed shards yet; finish pipelines/cache_teacher.py first")


def cache_dataset(cfg: PretrainConfig) -> tuple[ray.data.Dataset, int, list[float], list[float]]:
    """Cache parquet -> decoded views + stored tokens; no teacher anywhere."""
    fs, _, manifest, paths = open_cache(cfg.data.cache, cfg.s3)
    check_cache(manifest, cfg, cfg.data.cache)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=CACHE_COLUMNS,
                               shuffle="files" if cfg.data.shuffle_files else None)
    ds = ds.map_batches(cache_rows, batch_format="numpy", batch_size=64)
    rows = sum(rec.rows for rec in manifest.shards.values())
    teacher = manifest.settings.teacher
    return ds, rows, list(teacher["mean"]), list(teacher["std"])


def teacher_description(cfg: PretrainConfig) -> dict:
    """Where the targets come from: the cache manifest's teacher, or the configured online one."""
    if cfg.data.teacher_mode == "cache":
        return dict(open_cache(cfg.data.cache, cfg.s3)[2].settings.teacher)
    return {"arch": cfg.teacher.arch, "pretrained": cfg.teacher.pretrained,
            "random_seed": cfg.teacher_random_seed, "precision": cfg.teacher.precision}


def make_plan(cfg: PretrainConfig, rows: int, mean, std) -> LoopPlan:
    world = cfg.cluster.num_workers
    accum = cfg.train.accumulation(world)
    per_step = cfg.train.micro_batch * accum
    steps_per_epoch = (rows // world) // cfg.train.micro_batch // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data has {rows} rows: fewer than one step ({world} workers x {per_step} rows); "
            "add data or lower train.micro_batch / train.global_batch"
        )
    total, warmup = cfg.train.resolve(steps_per_epoch)
    return LoopPlan(rows_per_epoch=rows, steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup,
                    accumulation=accum, mean=mean, std=std, run_uri=run_uri(cfg),
                    teacher=teacher_description(cfg))


def save_resolved_config(cfg: PretrainConfig, plan: LoopPlan) -> None:
    fs, root = filesystem_for(plan.run_uri, cfg.s3)
    text = yaml.safe_dump({**to_dict(cfg), "plan": dataclasses.asdict(plan)}, sort_keys=False)
    write_bytes_atomic(fs, join(root, "config.yaml"), text.encode())


# --------------------------------------------------------------------- trainer
def build_trainer(
    cfg: PretrainConfig, ds: ray.data.Dataset, plan: LoopPlan, callbacks: list | None = None
) -> TorchTrainer:
    """The TorchTrainer of one run; ``callbacks`` (Ray Train ``UserCallback``s) let a sweep listen in."""
    cl = cfg.cluster
    resources = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {})}
    storage_path, storage_fs = cfg.run.storage_path, None
    if is_s3(storage_path):
        storage_path, storage_fs = storage_path[len(S3_SCHEME):], s3_filesystem(cfg.s3)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "plan": dataclasses.asdict(plan)},
        scaling_config=ray.train.ScalingConfig(num_workers=cl.num_workers, use_gpu=cl.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
        ),
        datasets={TRAIN_DATASET: ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[TRAIN_DATASET]),
    )


def local_num_cpus(cfg: PretrainConfig) -> int:
    """Logical CPUs for a new local Ray: the workers' plus ``cluster.data_cpus`` for Ray Data."""
    cl = cfg.cluster
    return math.ceil(cl.num_workers * cl.cpus_per_worker + cl.data_cpus)


def run(cfg: PretrainConfig) -> ray.train.Result:
    """Fit on the configured cluster; returns Ray Train's result (raises if training failed)."""
    cfg = resolve(cfg)
    started = init_ray(cfg.cluster.address, local_num_cpus(cfg))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        if cfg.data.teacher_mode == "cache":
            ds, rows, mean, std = cache_dataset(cfg)
        else:
            (ds, rows), mean, std = online_dataset(cfg), None, None
        plan = make_plan(cfg, rows, mean, std)
        save_resolved_config(cfg, plan)
        log.info("%s: %d rows, %d steps/epoch, %d steps (warm-up %d), accumulation %d, %d workers",
                 plan.run_uri, rows, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps,
                 plan.accumulation, cfg.cluster.num_workers)
        return build_trainer(cfg, ds, plan).fit()
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------- command line
def smoke_overrides(workdir: Path) -> list[str]:
    """Digits shards + a tiny random teacher in ``workdir``: a 2-worker CPU run in about a minute."""
    from pipelines.cache_teacher import SMOKE_TEACHER
    from uta_core.digits import CLASS_NAMES, TEMPLATES, write_digits_splits

    write_digits_splits(workdir / "digits", size=32, limit=400)
    arch = workdir / "uta-smoke-tiny.json"
    arch.write_text(json.dumps(SMOKE_TEACHER))
    templates = ", ".join(f"'{t}'" for t in TEMPLATES)
    return [
        "data.teacher_mode=online", f"data.input.paths={workdir / 'digits' / 'train'}", "data.views.size=32",
        "student.variant=nano", "student.img_size=32", "student.patch_size=4",
        f"student.out_dim={SMOKE_TEACHER['embed_dim']}",
        f"teacher.arch={arch}", "teacher.pretrained=null", "teacher_random_seed=0", "teacher.precision=fp32",
        "train.micro_batch=16", "train.max_steps=6", "train.warmup_steps=2", "optim.lr=1e-3",
        "run.name=smoke", f"run.storage_path={workdir / 'runs'}", "run.log_every=2", "run.checkpoint_every=3",
        f"eval.input.paths={workdir / 'digits' / 'heldout'}", f"eval.classnames=[{', '.join(CLASS_NAMES)}]",
        f"eval.templates=[{templates}]", "eval.max_images=200",
        "cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=1",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    smoke_help = "train a nano student for a few steps on generated digits with a tiny random teacher"
    return job_parser(__doc__, DEFAULT_CONFIG, smoke_help, "optim.lr=1e-3").parse_args(argv)


def print_summary(result: ray.train.Result) -> None:
    metrics = result.metrics or {}
    keys = ("step", "epoch", "loss", "lr", "images_per_s", "tokens_per_s", "zeroshot_top1", "zeroshot_top5")
    rows = [(k, f"{metrics[k]:.4g}" if isinstance(metrics[k], float) else str(metrics[k]))
            for k in keys if k in metrics]
    rows.append(("checkpoint", result.checkpoint.path if result.checkpoint else "-"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = start_job(args, smoke_overrides, "pretrain")
    return run_training_job(PretrainConfig, args, overrides, run, print_summary)


if __name__ == "__main__":
    sys.exit(main())

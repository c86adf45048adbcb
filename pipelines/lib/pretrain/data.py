"""Pre-training's Ray Data: raw shards -> seeded views (online teacher), or the teacher cache.

Both produce the same numpy rows (``uta_core.data.rows``): ``image`` uint8 (H, W, 3),
``label``, ``sample_id`` and, from the cache, the stored ``tokens``. The driver reads only
metadata here (shard lists, the cache manifest); decoding runs in Ray Data tasks.
"""

from __future__ import annotations

import dataclasses
import json

import ray

from pipelines.lib.pretrain.config import PretrainConfig
from uta_core.cache.format import open_cache
from uta_core.config import from_dict, to_dict
from uta_core.data.rows import cache_rows, count_images, online_rows
from uta_core.data.shards import InputShard, discover
from uta_core.models.teacher_weights import check_student_fits_teacher

CACHE_COLUMNS = ["key", "view", "pixels", "tokens", "label"]


def precheck_teacher(cfg: PretrainConfig) -> None:
    """Online mode: the teacher's grid and embed dim against the student's, before any worker starts."""
    check_student_fits_teacher(cfg.teacher.arch, cfg.student)


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

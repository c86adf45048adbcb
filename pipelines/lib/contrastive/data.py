"""The contrastive job's Ray Data: captioned shards -> decoded centre views + captions (CPU tasks).

Fresh crops are cut in the workers at every step (``uta_core.data.captions.augment``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import ray

from pipelines.lib.contrastive.config import ContrastiveJobConfig
from uta_core.data.captions import caption_rows
from uta_core.data.shards import InputShard, discover


def _read_shards(batch: dict, input_cfg, s3, size: int) -> dict:
    parts = [caption_rows(InputShard(**json.loads(s)), input_cfg, s3, size) for s in batch["shard"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def caption_dataset(cfg: ContrastiveJobConfig) -> ray.data.Dataset:
    size = cfg.data.decode_size or cfg.data.views.size
    shards = discover(cfg.data.input, cfg.s3).shards
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per shard
    return ds.map_batches(
        _read_shards, fn_kwargs={"input_cfg": cfg.data.input, "s3": cfg.s3, "size": size},
        batch_size=1, batch_format="numpy", num_cpus=1,
    )


def count_rows(cfg: ContrastiveJobConfig, ds: ray.data.Dataset) -> int | None:
    """Captioned images in the input: a full read, so only when epochs decide the length."""
    if cfg.train.max_steps is not None and cfg.train.warmup_steps is not None:
        return None
    rows = ds.count()
    per_step = cfg.train.micro_batch * cfg.cluster.num_workers
    if rows < per_step:
        raise ValueError(
            f"the input holds {rows} captioned images, fewer than one step's batch of {per_step} "
            "(train.micro_batch x cluster.num_workers); lower train.micro_batch"
        )
    return rows

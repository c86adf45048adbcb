"""Pre-training's data: what each rank reads in each epoch, from raw shards or the teacher cache.

The driver reads metadata only: the shard list (or the cache manifest) and per-source row
counts (the manifest's, img2dataset's ``*_stats.json``, or ``data.num_samples``). Each rank
then reads its own sources of the epoch (``uta_core.data.epochs``) through Ray Data tasks
that decode in parallel and hand the rows back in order, so a checkpoint's cursor replays
exactly. Both modes give the numpy rows of ``uta_core.data.rows``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from pipelines.lib.pretrain.config import PretrainConfig
from uta_core.cache.format import open_cache
from uta_core.config import from_dict, to_dict
from uta_core.data.epochs import Cursor, epoch_steps, producer_counts, rank_sources, spread
from uta_core.data.rows import ViewSource, cache_file_rows, online_rows
from uta_core.data.shards import InputShard, discover
from uta_core.data.storage import filesystem_for
from uta_core.models.teacher_weights import check_student_fits_teacher

log = logging.getLogger("uta.data")


@dataclass(kw_only=True)
class Sources:
    """What a run reads, as metadata every worker gets with the plan."""

    kind: str  # "online": raw input shards | "cache": the cache's part files
    items: list[str]  # JSON of an InputShard (online) or a cache file path (cache)
    rows: list[int]  # rows of each source in one epoch (views included)
    stored_views: int = 1  # cache: views per image in the cache
    view_sources: list[dict] | None = None  # cache without pixels: per item, the ViewSource.of(...) arguments
    counted_from: str = ""  # where the counts come from, for the log and MLflow

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def precheck_teacher(cfg: PretrainConfig) -> None:
    """Online mode: the teacher's grid and embed dim against the student's, before any worker starts."""
    check_student_fits_teacher(cfg.teacher.arch, cfg.student)


def online_sources(cfg: PretrainConfig) -> Sources:
    """Raw shards and their sample counts, from metadata only (never a pass over the data)."""
    precheck_teacher(cfg)
    inputs = discover(cfg.data.input, cfg.s3)
    if cfg.data.num_samples is not None:  # stated by the user: no stats file is read
        counts, origin = spread(cfg.data.num_samples, len(inputs.shards)), "data.num_samples"
    else:
        counts, origin = producer_counts(inputs.fs, inputs.shards), "img2dataset *_stats.json"
    if counts is None:
        raise ValueError(
            f"the number of images in {cfg.data.input.paths} is unknown and training never reads every shard to "
            "count them: set data.num_samples (the dataset's image count, as open_clip's --train-num-samples), "
            "or keep img2dataset's <shard>_stats.json files next to the shards"
        )
    items = [json.dumps(dataclasses.asdict(s)) for s in inputs.shards]
    return Sources(kind="online", items=items, rows=[n * cfg.data.num_views for n in counts], counted_from=origin)


def cache_sources(cfg: PretrainConfig) -> tuple[Sources, list[float], list[float]]:
    """The cache's part files and row counts from its manifest; no teacher anywhere."""
    fs, root, manifest, paths = open_cache(cfg.data.cache, cfg.s3)
    check_cache(manifest, cfg, cfg.data.cache)
    views = int(manifest.settings.views["num_views"])
    rows = [n for _, n in manifest.files()]
    if cfg.data.cache_views == "cycle":
        rows = [n // views for n in rows]
    teacher, view_sources = manifest.settings.teacher, None
    if manifest.settings.pixel_format == "none":  # metadata only: which input shard each part's views come from
        columns, size = manifest.settings.source_columns, manifest.settings.views["size"]
        view_sources = [{"record": manifest.shards[name].input_shard, "columns": columns, "size": size}
                        for name in sorted(manifest.shards) for _ in manifest.shards[name].parts]
    sources = Sources(kind="cache", items=list(paths), rows=rows, stored_views=views, counted_from="the cache manifest",
                      view_sources=view_sources)
    return sources, list(teacher["mean"]), list(teacher["std"])


def check_sources(sources: Sources, cfg: PretrainConfig) -> None:
    """Every rank needs a source and a whole step per epoch: refuse on the driver, before workers start."""
    world = cfg.cluster.num_workers
    if len(sources.items) < world:
        raise ValueError(f"{len(sources.items)} input shard(s) for cluster.num_workers={world}: each worker reads "
                         "its own shards; use fewer workers or write the data into more shards")
    rows_per_step = cfg.train.micro_batch * cfg.train.accumulation(world)
    if epoch_steps(sources.rows, cfg.run.seed, 0, cfg.data.shuffle_files, world, rows_per_step) < 1:
        raise ValueError(f"a worker's share of the {sources.total_rows} rows is less than one step of {rows_per_step} "
                         "rows; lower train.micro_batch / train.global_batch or use fewer workers")


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


def teacher_description(cfg: PretrainConfig) -> dict:
    """Where the targets come from: the cache manifest's teacher, or the configured online one."""
    if cfg.data.teacher_mode == "cache":
        return dict(open_cache(cfg.data.cache, cfg.s3)[2].settings.teacher)
    return {"arch": cfg.teacher.arch, "pretrained": cfg.teacher.pretrained,
            "random_seed": cfg.teacher_random_seed, "precision": cfg.teacher.precision}


# --------------------------------------------------------------------- a rank's epoch stream (workers)
def _read_block(batch: dict, cfg_dict: dict, kind: str, epoch: int, stored_views: int):
    """One Ray Data task: one source of a rank's epoch list -> its rows, from ``start`` on."""
    cfg = from_dict(PretrainConfig, cfg_dict)
    for item, pos, start, view_source in zip(batch["item"], batch["pos"], batch["start"], batch["view_source"]):
        if kind == "online":
            yield from online_rows(InputShard(**json.loads(item)), cfg.data.input, cfg.data.views,
                                   cfg.data.num_views, cfg.s3, epoch=epoch, start_row=int(start), source=int(pos))
        else:
            fs, _ = filesystem_for(cfg.data.cache, cfg.s3)
            view = epoch % stored_views if cfg.data.cache_views == "cycle" else None
            rebuild = ViewSource.of(**json.loads(view_source), s3=cfg.s3) if view_source else None
            yield from cache_file_rows(fs, str(item), view=view, start_row=int(start), source=int(pos),
                                       rebuild=rebuild)


class EpochStream:
    """A rank's micro-batches of one epoch, from a cursor, in an order every rerun repeats."""

    def __init__(self, cfg: PretrainConfig, sources: Sources, rank: int, world: int, rows_per_step: int) -> None:
        if len(sources.items) < world:
            raise ValueError(f"{len(sources.items)} sources for {world} workers: every worker needs at least one "
                             "shard; use fewer workers or split the data into more shards")
        self.cfg, self.sources, self.rank, self.world, self.rows_per_step = cfg, sources, rank, world, rows_per_step
        ray.data.DataContext.get_current().execution_options.preserve_order = True

    def steps(self, epoch: int) -> int:
        d = self.cfg.data
        return epoch_steps(self.sources.rows, self.cfg.run.seed, epoch, d.shuffle_files, self.world,
                           self.rows_per_step)

    def batches(self, epoch: int, cursor: Cursor) -> Iterator[tuple[dict, Cursor]]:
        """(numpy micro-batch, cursor after it); the rank's list starts over if it runs short."""
        d, src = self.cfg.data, self.sources
        order = rank_sources(len(src.items), self.cfg.run.seed, epoch, d.shuffle_files, self.rank, self.world)
        passes, first, start = cursor.passes, cursor.source, cursor.row
        while True:
            produced = False
            items = [{"item": src.items[order[p]], "pos": p, "start": start if p == first else 0,
                      "view_source": json.dumps(src.view_sources[order[p]]) if src.view_sources else ""}
                     for p in range(first, len(order))]
            if items:
                ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    _read_block, batch_size=1, batch_format="numpy",
                    fn_kwargs={"cfg_dict": to_dict(self.cfg), "kind": src.kind, "epoch": epoch,
                               "stored_views": src.stored_views})
                for batch in ds.iter_batches(batch_size=self.cfg.train.micro_batch, batch_format="numpy",
                                             drop_last=True, prefetch_batches=2,
                                             local_shuffle_buffer_size=d.shuffle_buffer or None,
                                             local_shuffle_seed=hash((self.cfg.run.seed, self.rank, epoch, passes))
                                             % 2**31):
                    produced = True
                    yield batch, Cursor(passes=passes, source=int(batch["source_pos"][-1]),
                                        row=int(batch["row_pos"][-1]) + 1)
            if not produced and first == 0:
                raise RuntimeError(f"rank {self.rank}: its sources of epoch {epoch} hold no full micro-batch of "
                                   f"{self.cfg.train.micro_batch} decodable rows; check the data or lower "
                                   "train.micro_batch")
            passes, first, start = passes + 1, 0, 0
            log.warning("rank %d: its sources of epoch %d gave fewer rows than counted; reading them again "
                        "(pass %d) to finish the epoch's steps", self.rank, epoch, passes)

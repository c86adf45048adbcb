"""Which rows each rank trains on in each epoch, in an order a resumed run can replay exactly.

Every training job reads a list of *sources* (raw input shards, captioned shards, or a
teacher cache's part files).
Epoch ``e`` orders them with a permutation seeded by (seed, e) and deals them to the ranks
round-robin: rank r reads ``order[r::world]``, each source's rows in file order. Every rank
trains the same number of steps in an epoch, computed from the per-source row counts the
plan carries (no rank reads more than metadata to know it); a rank whose sources yield
fewer rows than counted (undecodable images) starts its list again for the remainder.

Every row carries its place in that stream, so a checkpoint stores, per rank, the place
*after* the last row trained (``Cursor``) and the resumed run starts exactly there:
the rows of a killed-and-resumed epoch are the rows of an uninterrupted one. The stream
itself (reading, micro-batching, the shuffle window) is ``uta_core.data.stream``.

Row counts never come from reading the data: the cache manifest has them, img2dataset
writes ``<shard>_stats.json`` next to each shard (``successes``), or the user states the
dataset size (``data.num_samples``, open_clip's ``--train-num-samples``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from uta_core.data.shards import InputShard, folder_image_files
from uta_core.seeding import rng


@dataclass(frozen=True, kw_only=True)
class Sources:
    """What a run reads, as metadata the driver hands every worker: no pass over the data."""

    items: list[Any]  # what a reader reads: an InputShard, a cache part, ... (small, picklable)
    rows: list[int]  # rows of each item in one epoch (views included)
    counted_from: str  # where the counts come from, for the log and MLflow

    def __post_init__(self) -> None:
        if len(self.items) != len(self.rows):
            raise ValueError(f"{len(self.items)} sources but {len(self.rows)} row counts")

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def summary(self) -> dict[str, Any]:
        return {"count": len(self.items), "rows": self.total_rows, "counted_from": self.counted_from}


@dataclass(frozen=True, kw_only=True)
class Cursor:
    """A rank's place in its epoch stream: list pass, source index in its list, next row in it."""

    passes: int = 0  # how often the rank's list was started again (only when sources run short)
    source: int = 0  # index into the rank's list of this epoch
    row: int = 0  # position of the next row inside that source (online: sample * views + view)


def epoch_order(num_sources: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of all sources in ``epoch`` (the same on every rank and in every rerun)."""
    if not shuffle:
        return list(range(num_sources))
    return [int(i) for i in rng("order", seed, epoch).permutation(num_sources)]


def rank_sources(num_sources: int, seed: int, epoch: int, shuffle: bool, rank: int, world: int) -> list[int]:
    """Source indices rank ``rank`` reads in ``epoch``, in order."""
    return epoch_order(num_sources, seed, epoch, shuffle)[rank::world]


def epoch_steps(rows: list[int], seed: int, epoch: int, shuffle: bool, world: int, rows_per_step: int) -> int:
    """Optimiser steps every rank trains in ``epoch``: the smallest rank's rows, in whole steps."""
    smallest = min(sum(rows[i] for i in rank_sources(len(rows), seed, epoch, shuffle, r, world))
                   for r in range(world))
    return smallest // rows_per_step


# --------------------------------------------------------------------- row counts from metadata
def stats_path(shard_path: str) -> str:
    """img2dataset's stats file of a shard: ``00012.tar`` -> ``00012_stats.json``."""
    stem = shard_path
    for ext in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return f"{stem}_stats.json"


def producer_counts(fs: pafs.FileSystem, shards: list[InputShard]) -> list[int] | None:
    """Samples per shard from img2dataset's ``*_stats.json`` (``successes``), or for image folders
    the image files listed; None unless every shard has one. Never opens a shard."""
    if shards and all(s.format == "folder" for s in shards):
        return [folder_images(fs, s) for s in shards]
    paths = [stats_path(s.path) for s in shards]
    infos = fs.get_file_info(paths)
    if not shards or any(i.type != pafs.FileType.File for i in infos):
        return None
    counts = []
    for path in paths:
        with fs.open_input_stream(path) as f:
            stats = json.loads(f.read())
        if "successes" not in stats:
            return None
        counts.append(int(stats["successes"]))
    return counts


def spread(total: int, parts: int) -> list[int]:
    """``total`` rows over ``parts`` sources as evenly as possible (a stated dataset size)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def folder_images(fs: pafs.FileSystem, shard: InputShard) -> int:
    """Image files of a folder shard, from a listing (as ``iter_samples`` walks it)."""
    return sum(1 for _ in folder_image_files(fs, shard))

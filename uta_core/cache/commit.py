"""Committing cache shards (driver side): part-file metadata in, manifest records out.

Write tasks put each shard's rows straight into part files and hand on one metadata row per
part (``uta_core.cache.writer.PART_SCHEMA``): file, rows, bytes, sha256, the shard rows it holds
(``seq_ranges``) and, from the shard's last block, its total row count. ``ShardCommitter``
keeps, per shard, the parts whose rows it does not have yet (a retried task's parts hold rows
it has: they are dropped and deleted); once a shard's rows reach the announced total, its
record (parts in row order) goes into the manifest. The manifest is the commit: a reader
never sees a shard before all its parts are written. The driver handles metadata only. Every
write goes through the plan's ``CacheOutput``, which asks the lease first: a job that lost the
output stops at its next batch of parts and deletes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa

from uta_core.cache.format import PartRecord, ShardRecord, now, tmp_path
from uta_core.cache.plan import CachePlan
from uta_core.data.storage import join, read_bytes
from uta_core.lease import LeaseLost

log = logging.getLogger("uta.cache")


@dataclass(kw_only=True)
class CacheResult:
    committed: list[str] = field(default_factory=list)  # shards written by this run
    incomplete: list[str] = field(default_factory=list)  # shards left for a rerun
    partial: list[str] = field(default_factory=list)  # committed from a broken input: the rows before the damage
    images: int = 0
    views: int = 0
    skipped: int = 0
    bytes_written: int = 0
    duplicate_parts: int = 0  # parts of retried tasks whose rows had arrived already (dropped)
    driver_cpu_s: float = 0.0  # CPU time of the driver process while the pipeline ran


@dataclass(kw_only=True)
class _OpenShard:
    parts: list[tuple[int, PartRecord]] = field(default_factory=list)  # (first row, part)
    covered: list[tuple[int, int]] = field(default_factory=list)  # [first, end) of the rows accepted
    rows: int = 0
    expected: int | None = None


def _overlaps(covered: list[tuple[int, int]], ranges: list[list[int]]) -> bool:
    return any(a < end and start < b for a, b in ranges for start, end in covered)


class ShardCommitter:
    """Driver side: metadata of part files in, one manifest record per finished shard out."""

    def __init__(self, plan: CachePlan, *, compute: str, save_every_s: float = 5.0) -> None:
        self.plan, self.compute, self.save_every_s = plan, compute, save_every_s
        self.fs, self.root, self.out = plan.fs, plan.root, plan.out
        self.open: dict[str, _OpenShard] = {}
        self.dropped: list[str] = []  # part files to delete: duplicates, parts of unfinished shards
        self.result = CacheResult()
        self._unsaved, self._saved_at = False, time.monotonic()

    def add(self, parts: pa.Table) -> None:
        """Metadata rows of written parts (``PART_SCHEMA``); never pixels or tokens."""
        self.out.stop_if_lost()
        for row in parts.to_pylist():
            self._add_part(row)
        self._save()

    def _add_part(self, row: dict) -> None:
        name, ranges = row["shard"], json.loads(row["seq_ranges"])
        if name not in self.plan.pending:
            raise RuntimeError(f"a part of unexpected shard {name!r}")
        shard = None if name in self.result.committed else self.open.setdefault(name, _OpenShard())
        if shard is None or _overlaps(shard.covered, ranges):  # a retried task re-wrote rows we have
            self.dropped.append(row["file"])
            self.result.duplicate_parts += 1
            return
        shard.parts.append((ranges[0][0], PartRecord(file=row["file"], rows=row["rows"], bytes=row["bytes"],
                                                     sha256=row["sha256"], xxh3_128=row.get("xxh3_128"))))
        shard.covered += [(a, b) for a, b in ranges]
        shard.rows += row["rows"]
        if row["total"] >= 0:
            shard.expected = row["total"]
        if shard.expected is not None and shard.rows >= shard.expected:
            self._commit(name)

    def _commit(self, name: str) -> None:
        shard = self.open.pop(name, _OpenShard())
        stats = self._stats(name)
        if stats is None or stats["rows"] != shard.rows:
            raise RuntimeError(f"{name}: got parts of {shard.rows} rows but the reader reported {stats}")
        record = ShardRecord(source=stats["source"], rows=shard.rows, images=stats["images"],
                             skipped=stats["skipped"], errors=stats["errors"],
                             input_shard=dataclasses.asdict(self.plan.pending[name]),
                             parts=[part for _, part in sorted(shard.parts, key=lambda p: p[0])],
                             committed_at=now(), compute=self.compute, read_error=stats.get("read_error"))
        self.plan.manifest.shards[name] = record
        self._unsaved = True
        self.out.delete([tmp_path(self.root, name, ".stats.json")], f"the stats of committed shard {name}")
        r = self.result
        r.committed.append(name)
        r.images, r.views, r.skipped = r.images + record.images, r.views + record.rows, r.skipped + record.skipped
        r.bytes_written += record.bytes
        if record.read_error:
            r.partial.append(name)
            log.warning("%s: committed the %d images read before the input broke; a rerun reads it again",
                        name, record.images)
        log.info("committed %s: %d images, %d views in %d part(s), %d skipped, %.1f MB",
                 name, record.images, record.rows, len(record.parts), record.skipped, record.bytes / 1e6)

    def _save(self, force: bool = False) -> None:
        """Rewrite the manifest at most every ``save_every_s`` (its size grows with the shards):
        a killed run loses the last few seconds of commits, which the next run redoes."""
        if self._unsaved and (force or time.monotonic() - self._saved_at >= self.save_every_s):
            self.out.save_manifest(self.plan.manifest)
            self._unsaved, self._saved_at = False, time.monotonic()

    def _stats(self, name: str) -> dict | None:
        data = read_bytes(self.fs, tmp_path(self.root, name, ".stats.json"))
        return None if data is None else json.loads(data)

    def finish(self) -> CacheResult:
        """After the stream ends: commit shards that had no valid image; report and clean up the rest."""
        for name in self.plan.pending:
            if name in self.result.committed or name in self.open:
                continue
            stats = self._stats(name)
            if stats is not None and stats["rows"] == 0:
                self._commit(name)
            else:
                self.result.incomplete.append(name)
        for name, shard in self.open.items():
            log.error("%s: got %d of %s rows; it will be redone on rerun", name, shard.rows, shard.expected)
            self.result.incomplete.append(name)
        self.abort()
        if not self.result.incomplete:  # keep the stats of unfinished shards for a post-mortem
            self.out.clear_tmp()
        return self.result

    def abort(self, error: BaseException | None = None) -> None:
        """Save the shards committed so far; delete dropped parts and those of unfinished shards. After
        ``LeaseLost`` nothing: the output is another job's."""
        if isinstance(error, LeaseLost):
            return
        self._save(force=True)
        for shard in self.open.values():
            self.dropped += [part.file for _, part in shard.parts]
        self.open.clear()
        self.out.delete([join(self.root, f) for f in self.dropped], "the removal of uncommitted part files")
        self.dropped = []


def summary(result: CacheResult, seconds: float) -> dict[str, float]:
    return {
        "images": result.images, "views": result.views, "skipped": result.skipped,
        "shards_committed": len(result.committed), "shards_incomplete": len(result.incomplete),
        "shards_partial": len(result.partial),
        "seconds": seconds, "images_per_s": result.images / seconds if seconds > 0 else math.nan,
        "bytes_written": result.bytes_written,
        "bytes_per_view": result.bytes_written / result.views if result.views else math.nan,
        "duplicate_parts": result.duplicate_parts,
        "driver_cpu_ms_per_view": 1e3 * result.driver_cpu_s / result.views if result.views else math.nan,
    }

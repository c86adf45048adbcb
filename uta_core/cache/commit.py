"""Committing cache shards (driver side): rows of many shards in, one committed parquet per shard out.

``ShardCommitter`` appends rows to one temporary parquet per shard; once a shard's
(deduplicated) row count reaches its announced total, it closes, commits (rename / S3
copy) and records it in the manifest. Commits stream as shards finish, in any order, with
exact per-shard counts; a partial shard is never committed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uta_core.cache.format import (
    TMP_DIR,
    TOKENS_PARQUET_ENCODING,
    ShardRecord,
    cache_schema,
    now,
    save_manifest,
    shard_path,
    tmp_path,
)
from uta_core.cache.plan import CachePlan
from uta_core.cache.rows import SHARD_COLUMN, TOTAL_COLUMN
from uta_core.data.storage import commit_file, delete_file, join, open_hashing_sink, read_bytes, remove_dir

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


@dataclass(kw_only=True)
class _OpenShard:
    sink: Any
    writer: pq.ParquetWriter
    seen: set = field(default_factory=set)
    rows: int = 0
    expected: int | None = None
    buffer: list = field(default_factory=list)
    buffered_bytes: int = 0


class ShardCommitter:
    """Driver side: rows of many shards in, one committed parquet per finished shard out."""

    def __init__(self, plan: CachePlan, *, compute: str) -> None:
        self.plan, self.compute = plan, compute
        self.fs, self.root = plan.fs, plan.root
        self.schema = cache_schema(plan.manifest.settings)
        self.row_group_bytes = plan.cfg.output.row_group_mb << 20
        self.open: dict[str, _OpenShard] = {}
        self.result = CacheResult()

    def add(self, table: pa.Table) -> None:
        for name in pc.unique(table.column(SHARD_COLUMN)).to_pylist():
            part = table.filter(pc.equal(table.column(SHARD_COLUMN), name))
            self._add_part(name, part)

    def _add_part(self, name: str, part: pa.Table) -> None:
        if name not in self.plan.pending:
            raise RuntimeError(f"rows for unexpected shard {name!r}")
        if name in self.result.committed:  # a retried task re-emitted rows of a finished shard
            return
        shard = self.open.get(name) or self._start(name)
        total = pc.max(part.column(TOTAL_COLUMN)).as_py()
        if total >= 0:
            shard.expected = total
        fresh = [(k, v) not in shard.seen for k, v in zip(part.column("key").to_pylist(), part.column("view").to_pylist())]
        if not all(fresh):  # a retried task may re-emit rows
            part = part.filter(pa.array(fresh))
        shard.seen.update(zip(part.column("key").to_pylist(), part.column("view").to_pylist()))
        rows = pa.Table.from_arrays([part.column(n) for n in self.schema.names], schema=self.schema)
        shard.buffer.append(rows)
        shard.buffered_bytes += rows.nbytes
        shard.rows += rows.num_rows
        if shard.buffered_bytes >= self.row_group_bytes:
            self._flush(shard)
        if shard.expected is not None and shard.rows >= shard.expected:
            self._commit(name)

    def _start(self, name: str) -> _OpenShard:
        sink = open_hashing_sink(self.fs, tmp_path(self.root, name))
        small = [n for n in self.schema.names if n not in ("pixels", "tokens", "caption")]
        codec = self.plan.cfg.output.compression
        writer = pq.ParquetWriter(sink, self.schema, compression=codec, use_dictionary=False, write_statistics=small,
                                  column_encoding=TOKENS_PARQUET_ENCODING)
        self.open[name] = _OpenShard(sink=sink, writer=writer)
        return self.open[name]

    def _flush(self, shard: _OpenShard) -> None:
        if shard.buffer:
            table = pa.concat_tables(shard.buffer)
            shard.writer.write_table(table, row_group_size=table.num_rows)
            shard.buffer, shard.buffered_bytes = [], 0

    def _commit(self, name: str) -> None:
        shard = self.open.pop(name)
        self._flush(shard)
        shard.writer.close()
        shard.sink.close()
        stats = self._stats(name)
        if stats is None or stats["rows"] != shard.rows:
            raise RuntimeError(f"{name}: wrote {shard.rows} rows but the reader reported {stats}")
        commit_file(self.fs, tmp_path(self.root, name), shard_path(self.root, name), self.plan.cfg.s3)
        record = ShardRecord(source=stats["source"], rows=shard.rows, images=stats["images"],
                             skipped=stats["skipped"], errors=stats["errors"], sha256=shard.sink.sha256,
                             bytes=shard.sink.bytes, committed_at=now(), compute=self.compute,
                             read_error=stats.get("read_error"))
        self.plan.manifest.shards[name] = record
        save_manifest(self.fs, self.root, self.plan.manifest)
        delete_file(self.fs, tmp_path(self.root, name, ".stats.json"))
        r = self.result
        r.committed.append(name)
        r.images, r.views, r.skipped = r.images + record.images, r.views + record.rows, r.skipped + record.skipped
        r.bytes_written += record.bytes
        if record.read_error:
            r.partial.append(name)
            log.warning("%s: committed the %d images read before the input broke; a rerun reads it again",
                        name, record.images)
        log.info("committed %s: %d images, %d views, %d skipped, %.1f MB",
                 name, record.images, record.rows, record.skipped, record.bytes / 1e6)

    def _stats(self, name: str) -> dict | None:
        data = read_bytes(self.fs, tmp_path(self.root, name, ".stats.json"))
        return None if data is None else json.loads(data)

    def finish(self) -> CacheResult:
        """After the stream ends: commit shards that had no valid image; report the rest."""
        for name in self.plan.pending:
            if name in self.result.committed or name in self.open:
                continue
            stats = self._stats(name)
            if stats is not None and stats["rows"] == 0:
                self._start(name)
                self._commit(name)
            else:
                self.result.incomplete.append(name)
        for name in list(self.open):
            log.error("%s: got %d of %s rows; it will be redone on rerun", name, self.open[name].rows,
                      self.open[name].expected)
            self.result.incomplete.append(name)
        self.abort()
        if not self.result.incomplete:  # keep the stats of unfinished shards for a post-mortem
            remove_dir(self.fs, join(self.root, TMP_DIR))
        return self.result

    def abort(self) -> None:
        """Drop the temporary files of unfinished shards (never commit a partial shard)."""
        for name, shard in list(self.open.items()):
            try:  # close (the file is deleted next), so nothing writes to it when collected
                shard.writer.close()
                shard.sink.close()
            except (OSError, ValueError):
                pass
            delete_file(self.fs, tmp_path(self.root, name))
            self.open.pop(name)


def summary(result: CacheResult, seconds: float) -> dict[str, float]:
    return {
        "images": result.images, "views": result.views, "skipped": result.skipped,
        "shards_committed": len(result.committed), "shards_incomplete": len(result.incomplete),
        "shards_partial": len(result.partial),
        "seconds": seconds, "images_per_s": result.images / seconds if seconds > 0 else math.nan,
        "bytes_written": result.bytes_written,
        "bytes_per_view": result.bytes_written / result.views if result.views else math.nan,
    }

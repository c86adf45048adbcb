"""A rank's micro-batches of one epoch, from a cursor, in an order every rerun repeats.

``EpochStream`` turns a run's ``Sources`` (``uta_core.data.epochs``) into this rank's
micro-batches: the epoch's source order dealt to the ranks, each source read from its
first unread row by the job's *reader* (``reader(item, start, position)`` -> row blocks,
every row carrying ``source_pos`` and ``row_pos``), the blocks cut into micro-batches, and
after each one the cursor a checkpoint stores. *How* the sources are read is a parameter,
``read(reader, tasks)``: ``serial_read`` here (tests, benchmarks, one process), Ray tasks on
a cluster (``pipelines/lib/train/ray_runtime.py``), both in the rank's order.

With ``shuffle_buffer`` > 0 rows are permuted in windows of that many rows (seeded by
(seed, rank, epoch, pass)); the cursor after a batch is then the place of its last row, so
a resumed epoch may train up to a window of rows twice or not at all.

Shape legend: B micro-batch rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from uta_core.data.epochs import Cursor, Sources, epoch_steps, rank_sources
from uta_core.seeding import rng

__all__ = ["EpochStream", "ReadTask", "SourceReader", "micro_batches", "serial_read"]
log = logging.getLogger("uta.data")
Block = dict[str, np.ndarray]
ReadTask = tuple[Any, int, int]  # (source item, first row to read, its position in the rank's list)


class SourceReader(Protocol):
    """Reads one source of a rank's epoch: picklable, so a Ray task can run it."""

    def __call__(self, item: Any, start: int, source: int) -> Iterator[Block]: ...


ReadFn = Callable[[SourceReader, list[ReadTask]], Iterator[Block]]


def serial_read(reader: SourceReader, tasks: list[ReadTask]) -> Iterator[Block]:
    """Every task's blocks in order, in this process."""
    for item, start, source in tasks:
        yield from reader(item, start, source)


class EpochStream:
    """This rank's (micro-batch, cursor after it) of each epoch; every rank trains ``steps(epoch)``."""

    def __init__(self, sources: Sources, reader_for_epoch: Callable[[int], SourceReader], read: ReadFn, *,
                 rank: int, world: int, seed: int, shuffle_sources: bool, micro_batch: int, rows_per_step: int,
                 shuffle_buffer: int = 0) -> None:
        if len(sources.items) < world:
            raise ValueError(f"{len(sources.items)} sources for {world} workers: every worker needs at least one "
                             "shard; use fewer workers or split the data into more shards")
        self.sources, self.reader_for_epoch, self.read = sources, reader_for_epoch, read
        self.rank, self.world, self.seed, self.shuffle_sources = rank, world, seed, shuffle_sources
        self.micro_batch, self.rows_per_step, self.shuffle_buffer = micro_batch, rows_per_step, shuffle_buffer

    def steps(self, epoch: int) -> int:
        return epoch_steps(self.sources.rows, self.seed, epoch, self.shuffle_sources, self.world, self.rows_per_step)

    def batches(self, epoch: int, cursor: Cursor) -> Iterator[tuple[Block, Cursor]]:
        """(numpy micro-batch, cursor after it); the rank's list starts over if it runs short. The
        reading starts now (with a read function that submits its work when called), not at the
        first batch: a loop asks for the next epoch while it trains the last steps of this one."""
        order = rank_sources(len(self.sources.items), self.seed, epoch, self.shuffle_sources, self.rank, self.world)
        reader = self.reader_for_epoch(epoch)
        first_pass = self.read(reader, self._tasks(order, cursor.source, cursor.row))
        return self._batches(epoch, order, reader, cursor, first_pass)

    def _tasks(self, order: list[int], first: int, start: int) -> list:
        return [(self.sources.items[order[p]], start if p == first else 0, p) for p in range(first, len(order))]

    def _batches(self, epoch: int, order: list[int], reader: SourceReader, cursor: Cursor,
                 blocks: Iterator[Block]) -> Iterator[tuple[Block, Cursor]]:
        passes, first = cursor.passes, cursor.source
        while True:
            window = (self.shuffle_buffer, rng("shuffle", self.seed, self.rank, epoch, passes))
            produced = False
            for batch in micro_batches(blocks, self.micro_batch, *window):
                produced = True
                yield batch, Cursor(passes=passes, source=int(batch["source_pos"][-1]),
                                    row=int(batch["row_pos"][-1]) + 1)
            if not produced and first == 0:
                raise RuntimeError(f"rank {self.rank}: its sources of epoch {epoch} hold no full micro-batch of "
                                   f"{self.micro_batch} usable rows; check the data or lower train.micro_batch")
            passes, first = passes + 1, 0
            log.warning("rank %d: its sources of epoch %d gave fewer rows than counted; reading them again "
                        "(pass %d) to finish the epoch's steps", self.rank, epoch, passes)
            blocks = self.read(reader, self._tasks(order, 0, 0))


def micro_batches(blocks: Iterable[Block], size: int, shuffle_buffer: int = 0,
                  generator: np.random.Generator | None = None) -> Iterator[Block]:
    """Blocks of any length -> blocks of exactly ``size`` rows (a short tail is dropped); with
    ``shuffle_buffer``, each window of that many rows (at least ``size``) comes out permuted."""
    window = max(size, shuffle_buffer)
    pending: list[Block] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += _length(block)
        if held >= window:
            rows = _concat(pending)
            if shuffle_buffer:
                rows = _take(rows, generator.permutation(held))
            whole = held - held % size
            for start in range(0, whole, size):
                yield _slice(rows, start, start + size)
            pending, held = ([_slice(rows, whole, held)], held - whole) if held > whole else ([], 0)
    if held >= size:
        rows = _concat(pending)
        if shuffle_buffer:
            rows = _take(rows, generator.permutation(held))
        for start in range(0, held - held % size, size):
            yield _slice(rows, start, start + size)


def _length(block: Block) -> int:
    return len(next(iter(block.values())))


def _concat(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _slice(block: Block, start: int, stop: int) -> Block:
    return {k: v[start:stop] for k, v in block.items()}


def _take(block: Block, index: np.ndarray) -> Block:
    return {k: v[index] for k, v in block.items()}

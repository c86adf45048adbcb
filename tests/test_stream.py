"""A rank's epoch stream against a plain reference: which rows, in which order, from any cursor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from uta_core.data.epochs import Cursor, Sources, rank_sources
from uta_core.data.stream import EpochStream, micro_batches, serial_read
from uta_core.seeding import rng


@dataclass(frozen=True)
class Numbered:
    """A reader of numbered sources: source s holds rows s*1000 + r, handed on in uneven blocks;
    ``short`` sources hold fewer rows than counted (undecodable images)."""

    rows: dict[int, int]

    def __call__(self, item: int, start: int, source: int):
        ids = np.arange(start, self.rows[item]) + 1000 * item
        cuts = [0, *sorted(rng("cuts", item, start).choice(np.arange(1, max(2, len(ids))), size=2)), len(ids)]
        for a, b in itertools.pairwise(cuts):
            if b > a:
                yield {"id": ids[a:b], "source_pos": np.full(b - a, source), "row_pos": np.arange(start + a, start + b)}


def stream(counted, actual=None, world=1, rank=0, micro=4, shuffle_buffer=0):
    sources = Sources(items=list(range(len(counted))), rows=list(counted), counted_from="test")
    reader = Numbered(dict(enumerate(actual or counted)))
    return EpochStream(sources, lambda epoch: reader, serial_read, rank=rank, world=world, seed=7,
                       shuffle_sources=True, micro_batch=micro, rows_per_step=micro, shuffle_buffer=shuffle_buffer)


def reference_ids(counted, epoch, rank, world):
    order = rank_sources(len(counted), 7, epoch, True, rank, world)
    return [1000 * s + r for s in order for r in range(counted[s])]


def ids_of(s: EpochStream, epoch: int, cursor=Cursor(), steps=None):
    out = itertools.islice(s.batches(epoch, cursor), s.steps(epoch) if steps is None else steps)
    return [(b["id"].tolist(), c) for b, c in out]


def test_micro_batches_are_the_rows_in_order_cut_to_size_and_the_short_tail_dropped():
    blocks = [{"x": np.arange(a, b)} for a, b in ((0, 3), (3, 4), (4, 11), (11, 14))]
    got = [b["x"].tolist() for b in micro_batches(blocks, 4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_a_shuffle_window_permutes_each_window_of_rows_and_is_seeded():
    blocks = [{"x": np.arange(a, a + 5)} for a in range(0, 40, 5)]
    a = [b["x"].tolist() for b in micro_batches(blocks, 4, 16, np.random.default_rng(1))]
    b = [b["x"].tolist() for b in micro_batches(blocks, 4, 16, np.random.default_rng(1))]
    assert a == b and [len(x) for x in a] == [4] * 10
    flat = sum(a, [])
    # Windows fill to >= 16 rows from whole blocks of 5: rows 0-19 first, permuted, then 20-39.
    assert sorted(flat[:20]) == list(range(20)) and flat[:20] != list(range(20))
    assert sorted(flat[20:]) == list(range(20, 40))


def test_each_rank_reads_its_sources_in_the_epochs_order_and_every_rank_trains_the_same_steps():
    counted = [10, 7, 12, 9, 5]
    for epoch in (0, 1):
        steps = {stream(counted, world=2, rank=r).steps(epoch) for r in (0, 1)}
        (per_rank,) = steps
        smallest = min(len(reference_ids(counted, epoch, r, 2)) for r in (0, 1))
        assert per_rank == smallest // 4
        for rank in (0, 1):
            got = sum((ids for ids, _ in ids_of(stream(counted, world=2, rank=rank), epoch)), [])
            assert got == reference_ids(counted, epoch, rank, 2)[:4 * per_rank]


@pytest.mark.parametrize("stop", [1, 3, 6])
def test_a_stream_resumed_from_a_cursor_is_the_rest_of_the_uninterrupted_one(stop):
    counted = [10, 7, 12, 9]
    full = ids_of(stream(counted), 2)
    _, cursor = full[stop - 1]
    resumed = ids_of(stream(counted), 2, cursor, steps=len(full) - stop)
    assert [ids for ids, _ in resumed] == [ids for ids, _ in full[stop:]]


def test_sources_shorter_than_counted_are_read_again_to_finish_the_epoch(caplog):
    counted, actual = [8, 8], [8, 3]  # 16 rows counted, 11 readable: 4 steps of 4 need a second pass
    s = stream(counted, actual)
    batches = ids_of(s, 0)
    assert len(batches) == s.steps(0) == 4
    flat = sum((ids for ids, _ in batches), [])
    readable = [i for i in reference_ids(actual, 0, 0, 1)]
    assert flat[:8] == readable[:8] and set(flat) <= set(readable)
    assert batches[-1][1].passes == 1 and "reading them again" in caplog.text


def test_sources_without_a_single_micro_batch_are_an_error_not_a_hang():
    s = stream([8, 8], [1, 1])
    with pytest.raises(RuntimeError, match="no full micro-batch"):
        ids_of(s, 0)

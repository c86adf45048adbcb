"""Epoch streams: fresh seeded views per epoch, a replayable order, row counts from metadata only."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from uta_core.data.digits import digit_images, write_shards
from uta_core.data.epochs import epoch_order, epoch_steps, producer_counts, rank_sources, spread, stats_path
from uta_core.data.rows import OnlineRows, sample_id
from uta_core.data.shards import InputConfig, discover, iter_samples
from uta_core.data.storage import S3Options
from uta_core.data.views import ViewConfig, decode_image, sample_views


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("epochs")
    images, labels = digit_images(size=32)
    write_shards(root, images[:40], labels[:40], prefix="train", samples_per_shard=10)
    cfg = InputConfig(paths=[str(root)])
    return root, cfg, discover(cfg, S3Options())


def _rows(inputs, cfg, epoch, views=2, start_row=0):
    reader = OnlineRows(input=cfg, views=ViewConfig(size=32), num_views=views, s3=S3Options(), epoch=epoch)
    out = list(reader(inputs.shards[0], start_row, 0))
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def test_online_views_are_fresh_every_epoch_and_the_same_in_every_rerun(shards):
    _, cfg, inputs = shards
    e0, e1, e1_again, e2 = (_rows(inputs, cfg, e) for e in (0, 1, 1, 2))
    np.testing.assert_array_equal(e1["image"], e1_again["image"])  # reproducible
    for a, b in ((e0, e1), (e1, e2)):
        differ = [not np.array_equal(x, y) for x, y in zip(a["image"], b["image"])]
        assert sum(differ) >= 0.9 * len(differ)  # (a crop can repeat by chance, rarely)
    np.testing.assert_array_equal(e0["sample_id"], e1["sample_id"])  # the same (key, view) rows


def test_epoch_0_views_are_the_cache_jobs_views(shards):
    _, cfg, inputs = shards
    rows = _rows(inputs, cfg, 0)
    sample = next(iter_samples(inputs.fs, inputs.shards[0], cfg))
    cached = sample_views(decode_image(sample.image), sample.key, 2, ViewConfig(size=32))  # as the cache job calls it
    np.testing.assert_array_equal(rows["image"][:2], np.stack([p for _, p in cached]))


def test_a_stream_started_at_a_row_is_the_tail_of_the_full_stream(shards):
    _, cfg, inputs = shards
    full = _rows(inputs, cfg, epoch=3)
    assert list(full["row_pos"]) == list(range(20))  # 10 images x 2 views
    for start in (1, 7, 12):
        tail = _rows(inputs, cfg, epoch=3, start_row=start)
        np.testing.assert_array_equal(tail["image"], full["image"][start:])
        np.testing.assert_array_equal(tail["sample_id"], full["sample_id"][start:])


def test_epoch_orders_are_seeded_and_dealt_to_ranks_without_overlap():
    assert epoch_order(10, seed=0, epoch=1, shuffle=True) == epoch_order(10, seed=0, epoch=1, shuffle=True)
    assert epoch_order(10, seed=0, epoch=1, shuffle=True) != epoch_order(10, seed=0, epoch=2, shuffle=True)
    assert epoch_order(5, seed=0, epoch=7, shuffle=False) == [0, 1, 2, 3, 4]
    parts = [rank_sources(10, 0, 4, True, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]


def test_every_rank_trains_the_smallest_ranks_whole_steps():
    rows = [10, 10, 10, 30]
    for epoch in range(5):
        per_rank = [sum(rows[i] for i in rank_sources(4, 0, epoch, True, r, 2)) for r in range(2)]
        assert epoch_steps(rows, 0, epoch, True, 2, rows_per_step=8) == min(per_rank) // 8
    assert spread(10, 4) == [3, 3, 2, 2]


def test_sample_counts_come_from_img2dataset_stats_files_never_the_shards(shards, tmp_path):
    root, _, inputs = shards
    assert stats_path("/d/00012.tar") == "/d/00012_stats.json"
    assert producer_counts(inputs.fs, inputs.shards) == [10, 10, 10, 10]
    # Shards without stats: unknown (training then asks for data.num_samples), not counted by reading.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.tar").write_bytes((root / "train-00000.tar").read_bytes())
    no_stats = discover(InputConfig(paths=[str(lone)]), S3Options())
    assert producer_counts(no_stats.fs, no_stats.shards) is None
    (lone / "a_stats.json").write_text(json.dumps({"count": 12, "successes": 9}))
    assert producer_counts(pafs.LocalFileSystem(), no_stats.shards) == [9]


def test_sample_ids_do_not_depend_on_the_epoch():
    assert sample_id("k", 1) == sample_id("k", 1) != sample_id("k", 0)

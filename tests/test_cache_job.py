"""The caching job's Ray-free pieces driven by hand: part files written by write tasks, committed
by the driver from their metadata alone, on the announced count, in any order, with a retried
task's duplicates dropped; empty shards; partial shards never committed, their parts deleted."""

import json

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_digits_webdataset
from helpers import tiny_clip_model, write_model_config

from pipelines.lib.cache.config import CacheConfig
from uta_core.cache.commit import ShardCommitter
from uta_core.cache.format import load_codec, load_manifest
from uta_core.cache.plan import plan_cache, prepare_output
from uta_core.cache.writer import PART_SCHEMA, PartWriter, TokenEncoder, ViewTask, shard_view_tables
from uta_core.config import load_config
from uta_core.data.digits import digits_samples, webdataset_bytes

FS = pafs.LocalFileSystem()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    arch = write_model_config(folder, name="uta-job-tiny")
    weights = folder / "weights.pt"
    torch.save(tiny_clip_model(seed=0).state_dict(), weights)
    shards = write_digits_webdataset(folder / "wds", shards=2, per_shard=6)
    bad = digits_samples(3, offset=50)
    for s in bad:
        s.image = b"not an image"
    (folder / "wds" / "00002.tar").write_bytes(webdataset_bytes(bad))
    return folder, arch, weights, shards


def _args(setup, out) -> list[str]:
    folder, arch, weights, _ = setup
    return [f"input.paths={folder / 'wds'}", f"output.path={out}", f"teacher.arch={arch}",
            f"teacher.pretrained={weights}", "teacher.precision=fp32", "views.size=32", "num_views=2",
            "ray.images_per_block=2", "tracking.enabled=false"]


def config(setup, out) -> CacheConfig:
    return load_config(CacheConfig, None, _args(setup, out))


def written_parts(plan):
    """Every shard's blocks through the teacher and a write task, as the Ray pipeline runs them:
    part files on disk, and the metadata tables the driver gets."""
    codec = load_codec(plan.fs, plan.root, plan.manifest)
    encoder = TokenEncoder(plan.cfg, codec, device="cpu", fingerprint=plan.manifest.settings.teacher["fingerprint"])
    writer = PartWriter(root_uri=plan.cfg.output.path, s3=plan.cfg.s3, settings=plan.manifest.settings,
                        bytes_per_view=codec.bytes_per_view, compression="zstd", token_compression="none",
                        row_group_mb=64)
    task = ViewTask.from_plan(plan, images_per_block=plan.cfg.ray.images_per_block)
    blocks = {name: list(shard_view_tables(task, name, shard)) for name, shard in plan.pending.items()}
    return {name: [writer(encoder(t)) for t in tables] for name, tables in blocks.items()}, blocks, writer, encoder


def part_files(root, name):
    folder = root / "shards" / name
    return sorted(p.name for p in folder.glob("*.parquet")) if folder.exists() else []


def test_shards_commit_from_part_metadata_in_any_order_without_duplicates(setup, tmp_path):
    root = tmp_path / "cache"
    plan = plan_cache(config(setup, root))
    prepare_output(plan)
    parts, blocks, writer, encoder = written_parts(plan)
    assert [len(parts[n]) for n in ("00000", "00001", "00002")] == [3, 3, 0]  # 6 images / 2 per block
    for table in parts["00000"] + parts["00001"]:  # what the driver handles: metadata, no pixel or token
        assert table.schema == PART_SCHEMA and table.nbytes < 1000
    committer = ShardCommitter(plan, compute="cpu fp32", save_every_s=0)
    final_0 = parts["00000"].pop()  # the part that announces the shard's row count
    for table in reversed(parts["00000"] + parts["00001"]):  # interleaved, out of order
        committer.add(table)
    retried = writer(encoder(blocks["00001"][0]))  # a retried task: the same rows in a new part file
    assert len(part_files(root, "00001")) == 4
    committer.add(retried)
    assert load_manifest(FS, plan.root).shards.keys() == {"00001"}
    committer.add(final_0)
    result = committer.finish()
    assert sorted(result.committed) == ["00000", "00001", "00002"] and result.incomplete == []
    assert result.duplicate_parts == 1 and len(part_files(root, "00001")) == 3  # the duplicate is deleted
    manifest = load_manifest(FS, plan.root)
    for name in ("00000", "00001"):
        record = manifest.shards[name]
        assert [p.file.rsplit("/", 1)[1] for p in record.parts] == part_files(root, name)  # row order = name order
        table = pq.read_table([str(root / p.file) for p in record.parts])
        pairs = list(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
        assert len(pairs) == len(set(pairs)) == 12 == record.rows == sum(p.rows for p in record.parts)
        # Rows in the shard's order: image ordinal x views + view.
        keys = list(dict.fromkeys(table.column("key").to_pylist()))
        assert pairs == [(k, v) for k in keys for v in (0, 1)]
        for p in record.parts:
            data = (root / p.file).read_bytes()
            assert (len(data), __import__("hashlib").sha256(data).hexdigest()) == (p.bytes, p.sha256)
            assert __import__("xxhash").xxh3_128_hexdigest(data) == p.xxh3_128
    empty = manifest.shards["00002"]
    assert (empty.rows, empty.images, empty.skipped, empty.parts) == (0, 0, 3, [])
    assert result.skipped == 3 and result.views == 24
    assert not (root / "_tmp").exists()


def test_a_partial_shard_is_never_committed_and_its_parts_go(setup, tmp_path):
    root = tmp_path / "cache"
    plan = plan_cache(config(setup, root))
    prepare_output(plan)
    parts, *_ = written_parts(plan)
    committer = ShardCommitter(plan, compute="cpu fp32", save_every_s=0)
    for table in parts["00000"][1:] + parts["00001"]:  # 00000 misses a part: a lost task
        committer.add(table)
    result = committer.finish()
    assert result.committed == ["00001", "00002"] and result.incomplete == ["00000"]
    assert set(load_manifest(FS, plan.root).shards) == {"00001", "00002"}
    lost = parts["00000"][0].column("file")[0].as_py().rsplit("/", 1)[1]
    assert part_files(root, "00000") == [lost]  # the parts it heard of are deleted; the lost one ...
    # Its stats stay for a post-mortem; the rerun redoes exactly that shard, and clears the lost part.
    stats = json.loads((root / "_tmp" / "00000.stats.json").read_text())
    assert stats["rows"] == 12
    again = plan_cache(config(setup, root))
    assert list(again.pending) == ["00000"] and [p.rsplit("/", 1)[1] for p in again.stray] == [lost]
    prepare_output(again)
    assert part_files(root, "00000") == []


def test_a_rerun_deletes_parts_no_committed_shard_lists(setup, tmp_path):
    """A driver killed between a write and the manifest's save leaves parts behind: they go."""
    root = tmp_path / "cache"
    plan = plan_cache(config(setup, root))
    prepare_output(plan)
    parts, *_ = written_parts(plan)
    committer = ShardCommitter(plan, compute="cpu fp32", save_every_s=0)
    for table in parts["00001"]:
        committer.add(table)
    assert len(part_files(root, "00000")) == 3  # written, never committed: the driver "died" here
    again = plan_cache(config(setup, root))
    assert sorted(again.pending) == ["00000", "00002"] and again.done == ["00001"]
    assert len(again.stray) == 3 and all("/00000/" in p for p in again.stray)
    prepare_output(again)
    assert part_files(root, "00000") == [] and len(part_files(root, "00001")) == 3


def test_part_rows_restore_to_the_teachers_tokens(setup, tmp_path):
    root = tmp_path / "cache"
    plan = plan_cache(config(setup, root))
    prepare_output(plan)
    parts, blocks, _, encoder = written_parts(plan)
    first = parts["00000"][0].to_pylist()[0]
    table = pq.read_table(str(root / first["file"]))
    codec = load_codec(plan.fs, plan.root, plan.manifest)
    from uta_core.cache.reader import read_cache_rows
    from uta_core.data.views import to_model_input
    pixels, tokens = read_cache_rows(table, codec)
    t = encoder.teacher
    ref = t.encode_tokens(to_model_input(pixels, t.mean, t.std))
    torch.testing.assert_close(tokens, ref.half().float(), rtol=0, atol=0)
    assert np.asarray(json.loads(first["seq_ranges"])).tolist() == [[0, table.num_rows]]


def test_a_cache_without_pixels_rebuilds_exactly_the_views_the_teacher_saw(setup, tmp_path):
    """``output.pixel_format=none``: the rows hold no pixels; the reader rebuilds each view from the
    input shard and the recorded crop / flip, bit for bit the pixels the teacher was given."""
    from uta_core.cache.format import byte_rows
    from uta_core.cache.reader import ViewSource, cache_file_rows
    from uta_core.cache.writer import RAW_COLUMN, SEQ_COLUMN

    root = tmp_path / "cache"
    cfg = load_config(CacheConfig, None, [*_args(setup, root), "output.pixel_format=none"])
    plan = plan_cache(cfg)
    prepare_output(plan)
    parts, blocks, *_ = written_parts(plan)
    committer = ShardCommitter(plan, compute="cpu fp32", save_every_s=0)
    for tables in parts.values():
        for table in tables:
            committer.add(table)
    committer.finish()
    manifest = load_manifest(FS, plan.root)
    assert manifest.settings.source_columns == {"image_column": "image", "key_column": None}
    for name in ("00000", "00001"):
        seen = {}  # (key, view) -> the pixels the teacher actor got
        for block in blocks[name]:
            raw = byte_rows(block.column(RAW_COLUMN)).reshape(-1, 32, 32, 3)
            seen.update(zip(zip(block.column("key").to_pylist(), block.column("view").to_pylist()), raw))
            assert all(len(p) == 0 for p in block.column("pixels").to_pylist())  # nothing stored
        assert SEQ_COLUMN in blocks[name][0].column_names
        record = manifest.shards[name]
        src = ViewSource.of(record.input_shard, manifest.settings.source_columns, 32)
        rebuilt = {}
        for part in record.parts:
            for rows in cache_file_rows(FS, str(root / part.file), rebuild=src, block=5):
                rebuilt.update(zip(rows["sample_id"].tolist(), rows["image"]))
        from uta_core.data.rows import sample_id
        assert len(rebuilt) == len(seen) == 12
        for (key, view), pixels in seen.items():
            np.testing.assert_array_equal(rebuilt[sample_id(key, view)], pixels)

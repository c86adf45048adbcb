"""The caching job's Ray-free pieces driven by hand: commit on the announced count, in any
order, with duplicates; empty shards; partial shards never committed."""

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_digits_webdataset
from helpers import tiny_clip_model, write_model_config

from uta_core.cache.format import load_manifest, shard_path, tmp_path
from pipelines.lib.cache.config import CacheConfig
from uta_core.cache.commit import ShardCommitter
from uta_core.cache.plan import plan_cache, prepare_output
from uta_core.cache.rows import TokenEncoder, ViewTask, shard_view_tables
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


def config(setup, out) -> CacheConfig:
    folder, arch, weights, _ = setup
    return load_config(CacheConfig, None, [
        f"input.paths={folder / 'wds'}", f"output.path={out}", f"teacher.arch={arch}",
        f"teacher.pretrained={weights}", "teacher.precision=fp32", "views.size=32", "num_views=2",
        "ray.images_per_block=2", "tracking.enabled=false",
    ])


def encoded_tables(plan):
    """Every shard's view tables, through the teacher, as the Ray pipeline would produce them."""
    encoder = TokenEncoder(plan.cfg, device="cpu", fingerprint=plan.manifest.settings.teacher["fingerprint"])
    task = ViewTask.from_plan(plan, images_per_block=plan.cfg.ray.images_per_block)
    return {name: [encoder(t) for t in shard_view_tables(task, name, shard)] for name, shard in plan.pending.items()}


def test_shards_commit_when_their_announced_count_arrives_in_any_order(setup, tmp_path):
    plan = plan_cache(config(setup, tmp_path / "cache"))
    prepare_output(plan)
    tables = encoded_tables(plan)
    assert [len(tables[n]) for n in ("00000", "00001", "00002")] == [3, 3, 0]  # 6 images / 2 per block
    committer = ShardCommitter(plan, compute="cpu fp32")
    final_0 = tables["00000"].pop()  # the block that announces the shard's row count
    for table in reversed(tables["00000"] + tables["00001"]):  # interleaved, out of order
        committer.add(table)
    committer.add(tables["00001"][0])  # a retried task's duplicate rows
    assert load_manifest(FS, plan.root).shards.keys() == {"00001"}
    assert not FS.get_file_info(shard_path(plan.root, "00000")).type == pafs.FileType.File
    committer.add(final_0)
    result = committer.finish()
    assert sorted(result.committed) == ["00000", "00001", "00002"] and result.incomplete == []
    manifest = load_manifest(FS, plan.root)
    for name in ("00000", "00001"):
        table = pq.read_table(shard_path(plan.root, name))
        pairs = list(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
        assert len(pairs) == len(set(pairs)) == 12 == manifest.shards[name].rows
    empty = manifest.shards["00002"]
    assert (empty.rows, empty.images, empty.skipped) == (0, 0, 3)
    assert pq.read_table(shard_path(plan.root, "00002")).num_rows == 0
    assert result.skipped == 3 and result.views == 24


def test_a_partial_shard_is_never_committed(setup, tmp_path):
    plan = plan_cache(config(setup, tmp_path / "cache"))
    prepare_output(plan)
    tables = encoded_tables(plan)
    committer = ShardCommitter(plan, compute="cpu fp32")
    for table in tables["00000"][1:] + tables["00001"]:  # 00000 misses a block: a lost task
        committer.add(table)
    result = committer.finish()
    assert result.committed == ["00001", "00002"] and result.incomplete == ["00000"]
    assert set(load_manifest(FS, plan.root).shards) == {"00001", "00002"}
    assert FS.get_file_info(tmp_path_of(plan, "00000")).type == pafs.FileType.NotFound
    assert FS.get_file_info(shard_path(plan.root, "00000")).type == pafs.FileType.NotFound
    # Its stats stay for a post-mortem; the rerun redoes exactly that shard.
    stats = json.loads((tmp_path / "cache" / "_tmp" / "00000.stats.json").read_text())
    assert stats["rows"] == 12
    assert list(plan_cache(config(setup, tmp_path / "cache")).pending) == ["00000"]


def tmp_path_of(plan, name):
    return tmp_path(plan.root, name)

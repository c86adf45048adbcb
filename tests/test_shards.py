"""Input shards: img2dataset tars, image folders and parquet, read as the job reads them."""

import io
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from uta_core.data.digits import digits_samples, webdataset_bytes
from uta_core.data.shards import (
    InputConfig,
    ShardReadError,
    discover,
    iter_samples,
    shard_names,
    split_key,
)
from uta_core.data.storage import S3Options, StorageError

FS = pafs.LocalFileSystem()


def _read(shard, cfg=None):
    return list(iter_samples(FS, shard, cfg or InputConfig(paths=["unused"])))


@pytest.mark.parametrize(
    "member, expected",
    [("000001.jpg", ("000001", "jpg")), ("a/b/000001.JSON", ("a/b/000001", "json")),
     ("x.seg.png", ("x", "seg.png")), ("noext", None)],
)
def test_split_key_follows_webdataset(member, expected):
    assert split_key(member) == expected


def test_webdataset_samples_group_members_by_key(tmp_path):
    samples = digits_samples(5)
    (tmp_path / "00000.tar").write_bytes(webdataset_bytes(samples))
    inputs = discover(InputConfig(paths=[str(tmp_path)]), S3Options())
    assert inputs.format == "webdataset" and len(inputs.shards) == 1
    read = _read(inputs.shards[0])
    assert [(s.key, s.image, s.label, s.caption) for s in read] == [
        (s.key, s.image, s.label, s.caption) for s in samples]
    assert read[3].caption == "a photo of the digit three"


def test_truncated_tar_yields_whole_samples_then_fails(tmp_path):
    samples = digits_samples(6)
    data = webdataset_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember(f"{samples[4].key}.png").offset_data + 50
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    (shard,) = discover(InputConfig(paths=[str(tmp_path / "*.tar")]), S3Options()).shards
    read = []
    with pytest.raises(ShardReadError, match="truncated or corrupt"):
        for sample in iter_samples(FS, shard, InputConfig(paths=["x"])):
            read.append(sample.key)
    assert read == [s.key for s in samples[:4]]


def test_image_folders_label_by_sorted_class_names_across_roots(tmp_path):
    (png,) = [s.image for s in digits_samples(1)]
    for root, cls in [("r1", "cat"), ("r1", "dog"), ("r2", "ant"), ("r2", "dog")]:
        (tmp_path / root / cls / "sub").mkdir(parents=True)
        (tmp_path / root / cls / "sub" / "img.png").write_bytes(png)
        (tmp_path / root / cls / "notes.txt").write_bytes(b"ignored")
    inputs = discover(InputConfig(paths=[str(tmp_path / "r1"), str(tmp_path / "r2")], format="folder"), S3Options())
    assert inputs.class_names == ["ant", "cat", "dog"]
    assert [(s.uri.split("/")[-2] + "/" + s.uri.split("/")[-1], s.label) for s in inputs.shards] == [
        ("r1/cat", 1), ("r1/dog", 2), ("r2/ant", 0), ("r2/dog", 2)]
    (sample,) = _read(inputs.shards[1])
    assert (sample.key, sample.label) == ("dog/sub/img", 2)


def test_flat_image_folder_is_one_unlabelled_shard(tmp_path):
    for s in digits_samples(3):
        (tmp_path / f"{s.key}.png").write_bytes(s.image)
    inputs = discover(InputConfig(paths=[str(tmp_path)]), S3Options())
    assert inputs.format == "folder" and inputs.class_names is None and len(inputs.shards) == 1
    assert [(s.key, s.label) for s in _read(inputs.shards[0])] == [(f"{i:09d}", None) for i in range(3)]


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_rows_with_configured_columns(tmp_path, struct):
    samples = digits_samples(4)
    images = pa.array([s.image for s in samples], pa.binary())
    if struct:  # Hugging Face datasets' Image feature
        images = pa.StructArray.from_arrays([images, pa.array(["p"] * 4)], names=["bytes", "path"])
    table = pa.table({"jpg": images, "id": [s.key for s in samples], "y": [s.label for s in samples],
                      "text": [s.caption for s in samples]})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=3)
    cfg = InputConfig(paths=[str(tmp_path)], image_column="jpg", key_column="id", label_column="y",
                      caption_column="text")
    (shard,) = discover(cfg, S3Options()).shards
    assert [(s.key, s.image, s.label, s.caption) for s in _read(shard, cfg)] == [
        (s.key, s.image, s.label, s.caption) for s in samples]
    default_keys = InputConfig(paths=[str(tmp_path)], image_column="jpg")
    assert [s.key for s in _read(shard, default_keys)] == [f"{i:09d}" for i in range(4)]


def test_parquet_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="input.caption_column='text' is not a column"):
        discover(InputConfig(paths=[str(tmp_path)], caption_column="text"), S3Options())


def test_shard_names_are_stems_unless_they_collide():
    uris = ["s3://b/a/00000.tar", "s3://b/a/00001.tar", "s3://b/c/00000.tar", "/d/x.tar.gz"]
    names = shard_names(uris)
    assert names[1] == "00001" and names[3] == "x"
    assert names[0].startswith("00000-") and names[2].startswith("00000-") and names[0] != names[2]
    assert shard_names(uris) == names  # deterministic
    # A later run adding another 00000.tar keeps the committed name and hashes the newcomer.
    assert shard_names(["s3://b/a/00000.tar"], {"00000": "s3://b/a/00000.tar"}) == ["00000"]
    (other,) = shard_names(["s3://b/z/00000.tar"], {"00000": "s3://b/a/00000.tar"})
    assert other.startswith("00000-")


def test_unknown_format_is_explained(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(StorageError, match="set input.format"):
        discover(InputConfig(paths=[str(tmp_path)]), S3Options())
    with pytest.raises(StorageError, match="is not a webdataset shard"):
        discover(InputConfig(paths=[str(tmp_path / "x.csv")], format="webdataset"), S3Options())

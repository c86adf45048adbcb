"""Storage: globs, fail-fast errors, atomic writes and commits, on local disk and a loopback S3."""

import hashlib
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from uta_core.cache.sink import open_hashing_sink
from uta_core.data.storage import (
    S3Options,
    StorageError,
    delete_files,
    expand,
    glob_regex,
    read_bytes,
    remove_dir,
    s3_filesystem,
    translate_error,
    write_bytes_atomic,
)


@pytest.mark.parametrize(
    "pattern, matches, misses",
    [
        ("/d/*.tar", ["/d/0.tar", "/d/a b.tar"], ["/d/x/0.tar", "/d/0.tar.gz", "/e/0.tar"]),
        ("/d/**/*.tar", ["/d/0.tar", "/d/x/y/0.tar"], ["/d/0.parquet"]),
        ("/d/0000[0-4].tar", ["/d/00003.tar"], ["/d/00005.tar"]),
        ("/d/0000[!0-4].tar", ["/d/00005.tar"], ["/d/00003.tar"]),
        ("/d/?.tar", ["/d/a.tar"], ["/d/ab.tar", "/d/.x/a.tar"]),
        ("bucket/p+q/*.tar", ["bucket/p+q/1.tar"], ["bucket/pq/1.tar"]),
    ],
)
def test_glob_regex_matches_like_a_shell(pattern, matches, misses):
    regex = glob_regex(pattern)
    assert all(regex.fullmatch(p) for p in matches)
    assert not any(regex.fullmatch(p) for p in misses)


def test_expand_local_paths_globs_and_lists(tmp_path):
    for name in ("a/0.tar", "a/1.tar", "a/x.txt", "b/2.tar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    _, infos = expand([str(tmp_path / "a/*.tar"), str(tmp_path / "b/2.tar"), str(tmp_path / "a/0.tar")], S3Options())
    assert [os.path.relpath(i.path, tmp_path) for i in infos] == ["a/0.tar", "a/1.tar", "b/2.tar"]


@pytest.mark.parametrize(
    "paths, message",
    [(["nope.tar"], "does not exist"), (["nope/*.tar"], "does not exist"), (["a/*.parquet"], "matched no files"),
     ([], "no input paths"), (["a", "s3://bucket/x"], "mix s3:// URIs and local paths"),
     (["http://host/x.tar"], "only local paths and s3:// URIs")],
)
def test_expand_explains_bad_inputs(tmp_path, paths, message):
    (tmp_path / "a").mkdir()
    paths = [p if "://" in p else str(tmp_path / p) for p in paths]
    with pytest.raises(StorageError, match=message):
        expand(paths, S3Options())


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    fs = pafs.LocalFileSystem()
    path = str(tmp_path / "new" / "manifest.json")
    write_bytes_atomic(fs, path, b"one")
    write_bytes_atomic(fs, path, b"two")
    assert read_bytes(fs, path) == b"two" and os.listdir(tmp_path / "new") == ["manifest.json"]
    assert read_bytes(fs, str(tmp_path / "missing")) is None


def _write_parquet_through_sink(fs, path):
    table = pa.table({"x": list(range(1000))})
    sink = open_hashing_sink(fs, path)
    writer = pq.ParquetWriter(sink, table.schema)
    writer.write_table(table)
    writer.close()
    sink.close()
    return sink, table


def test_hashing_sink_checksums_are_the_files_sha256_and_xxh3(tmp_path):
    import xxhash

    fs = pafs.LocalFileSystem()
    path = str(tmp_path / "tmp" / "x.parquet")
    sink, table = _write_parquet_through_sink(fs, path)
    data = (tmp_path / "tmp" / "x.parquet").read_bytes()
    assert (sink.sha256, sink.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sink.xxh3_128 == xxhash.xxh3_128_hexdigest(data)  # the reference library's digest of the file
    assert pq.read_table(path).equals(table)


def test_local_delete_files_and_remove_dir(tmp_path):
    fs = pafs.LocalFileSystem()
    paths = [str(tmp_path / "shards" / "a" / f"{i}.parquet") for i in range(3)]
    for path in paths:
        _write_parquet_through_sink(fs, path)
    delete_files(fs, paths[:2] + [str(tmp_path / "missing.parquet")], S3Options())
    assert sorted(p.name for p in (tmp_path / "shards" / "a").iterdir()) == ["2.parquet"]
    remove_dir(fs, str(tmp_path / "shards"))
    remove_dir(fs, str(tmp_path / "shards"))  # idempotent
    assert not (tmp_path / "shards").exists()


def test_s3_delete_files_leaves_no_folder_marker(s3_server, s3_client, s3_bucket):
    opts = S3Options(endpoint_url=s3_server)
    fs = s3_filesystem(opts)
    paths = [f"{s3_bucket}/c/shards/a/{i}.parquet" for i in range(3)]
    for path in paths:
        _write_parquet_through_sink(fs, path)
    delete_files(fs, paths[:2] + [f"{s3_bucket}/c/shards/a/missing.parquet"], opts)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["c/shards/a/2.parquet"]
    remove_dir(fs, f"{s3_bucket}/c")
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0  # no folder marker left


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("When getting information for bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation: "
         "No response body.", "access to s3://b/x was denied"),
        ("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access Key Id "
         "AKIAABCDEFGHIJKLMNOP you provided does not exist (Request ID: 123)", "check the AWS credentials"),
        ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server",
         "cannot reach http://h:1 for s3://b/x"),
        ("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: The specified bucket does not exist",
         "bucket of s3://b/x does not exist"),
    ],
)
def test_storage_errors_are_translated_without_key_ids(raw, expected):
    err = translate_error(OSError(raw), "s3://b/x", S3Options(endpoint_url="http://h:1"))
    assert expected in str(err) and "AKIA" not in str(err) and "Request ID" not in str(err)


@pytest.mark.parametrize("url", ["http://user:pw@host:9000", "host:9000", "http://host/path"])
def test_s3_endpoint_must_be_a_plain_url(url):
    with pytest.raises(ValueError, match="endpoint_url"):
        S3Options(endpoint_url=url)

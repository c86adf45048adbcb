"""The teacher-feature caching job end to end, on real local Ray, a loopback S3 API and real images.

Every check compares the cache with a plain reference: the views are rebuilt from the
source images and the recorded crop/flip, and the tokens are recomputed by an
independently built teacher on the stored pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_AWS_ENV
from helpers import tiny_clip_model, write_model_config

from pipelines.cache_teacher import main
from pipelines.lib.cache import job
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cache.job import run
from pipelines.lib.ray_setup import free_port
from uta_core.cache.codecs import quantize_int8
from uta_core.cache.format import decode_pixels, encode_view, load_codec, load_manifest, open_cache
from uta_core.cache.plan import CacheMismatchError, plan_cache
from uta_core.cache.reader import read_cache_rows
from uta_core.cache.writer import PART_SCHEMA
from uta_core.config import load_config
from uta_core.data.digits import digits_samples, webdataset_bytes
from uta_core.data.shards import Sample
from uta_core.data.storage import StorageError, s3_filesystem
from uta_core.data.views import ViewParams, decode_image, render_view, to_model_input
from uta_core.models.teacher import Teacher

TEACHER_NAME = "uta-cache-tiny"  # 32 px, patch 4 -> 8x8 grid, D = 32
NUM_VIEWS = 2
SECRET = FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"]


# --------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A tiny open_clip config + weights file; ``reference`` is built independently of the job."""
    folder = tmp_path_factory.mktemp("teacher")
    arch = write_model_config(folder, name=TEACHER_NAME)
    weights = folder / "weights.pt"
    torch.save(tiny_clip_model(seed=0).state_dict(), weights)
    other = folder / "other_weights.pt"
    torch.save(tiny_clip_model(seed=1).state_dict(), other)
    reference = Teacher(tiny_clip_model(seed=0), arch=TEACHER_NAME)
    return SimpleNamespace(arch=str(arch), weights=str(weights), other_weights=str(other), reference=reference)


def cache_config(inputs, output, files, *extra, endpoint=None, tracking_uri=None) -> CacheConfig:
    overrides = [
        f"input.paths={json.dumps([str(p) for p in inputs])}", f"output.path={output}",
        f"teacher.arch={files.arch}", f"teacher.pretrained={files.weights}", "teacher.precision=fp32",
        "views.size=32", f"num_views={NUM_VIEWS}", "ray.batch_size=16", "ray.images_per_block=4",
        "ray.progress_bars=false",
        f"tracking.tracking_uri={tracking_uri}" if tracking_uri else "tracking.enabled=false",
    ]
    if endpoint:
        overrides.append(f"s3.endpoint_url={endpoint}")
    return load_config(CacheConfig, None, overrides + list(extra))


def read_shards(fs, root) -> tuple:
    """The manifest and each shard's rows: its part files, in the manifest's order."""
    manifest = load_manifest(fs, root)
    tables = {name: pa.concat_tables([pq.read_table(f"{root}/{p.file}", filesystem=fs) for p in rec.parts])
              for name, rec in manifest.shards.items()}
    return manifest, tables


def check_rows(table: pa.Table, samples: dict[str, Sample], reference: Teacher, codec) -> None:
    """Key x view exactly once; pixels = the recorded view of the source; tokens = the teacher's."""
    pairs = list(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
    assert sorted(pairs) == sorted((k, v) for k in samples for v in range(NUM_VIEWS))
    pixels_BHW3, tokens_BTD = read_cache_rows(table, codec)
    meta = table.drop_columns(["pixels", "tokens"]).to_pylist()
    for i, row in enumerate(meta):
        sample = samples[row["key"]]
        params = ViewParams(top=row["crop_top"], left=row["crop_left"], height=row["crop_height"],
                            width=row["crop_width"], flip=row["flip"])
        view_HW3 = render_view(decode_image(sample.image), params, 32)
        if table.column("pixels")[i].as_py()[:2] == b"\xff\xd8":  # a JPEG view: as every reader decodes it
            view_HW3 = decode_pixels([encode_view(view_HW3, "jpeg", 95)])[0]
        np.testing.assert_array_equal(pixels_BHW3[i].numpy(), view_HW3)
        assert (row["label"], row["caption"]) == (sample.label, sample.caption)
    ref_BTD = reference.encode_tokens(to_model_input(pixels_BHW3, reference.mean, reference.std))
    assert tokens_BTD.shape == ref_BTD.shape == (len(meta), 1 + 64, 32)
    assert table.schema.field("tokens").type == pa.binary(codec.bytes_per_view)
    cos_BT = torch.nn.functional.cosine_similarity(tokens_BTD, ref_BTD, dim=-1)
    if codec.name == "float16":
        scale = ref_BTD.abs().max().item()
        torch.testing.assert_close(tokens_BTD, ref_BTD, rtol=1e-3, atol=1e-3 * scale)
    elif codec.name == "int8":
        stored = np.frombuffer(b"".join(table.column("tokens").to_pylist()), np.int8).reshape(ref_BTD.shape)
        assert np.abs(stored.astype(np.int16) - quantize_int8(ref_BTD).numpy()).max() <= 1  # rounding ties
        assert cos_BT.min() > 0.9995
    else:  # lowrank_int8: the CLS at fp16, the patches within the cosine measured when the basis was fitted
        torch.testing.assert_close(tokens_BTD[:, 0], ref_BTD[:, 0], rtol=1e-3, atol=1e-3 * ref_BTD.abs().max().item())
        assert cos_BT[:, 1:].mean() > 0.95


def corrupt_shard_samples() -> tuple[list[Sample], list[str]]:
    """6 digits; one truncated PNG, one non-image, one sample without an image: 3 skipped."""
    samples = digits_samples(6, size=32, offset=100)
    samples[1].image = samples[1].image[: len(samples[1].image) // 2]
    samples[3].image = b"this is not an image"
    samples[4].image = None  # only .cls/.txt members in the tar
    return samples, [samples[i].key for i in (1, 3, 4)]


def truncated_tar(samples: list[Sample], cut_in_sample: int) -> bytes:
    """A tar cut inside the image of sample ``cut_in_sample``: earlier samples stay readable."""
    data = webdataset_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(f"{samples[cut_in_sample].key}.png")
    return data[: member.offset_data + 100]


def good(samples: list[Sample], bad_keys=()) -> dict[str, Sample]:
    return {s.key: s for s in samples if s.key not in bad_keys}


# --------------------------------------------------------------------- S3, WebDataset
@pytest.fixture(scope="module")
def s3_cache(ray_local, s3_server, s3_client, digits_webdataset, teacher_files, tmp_path_factory):
    bucket = "cache-e2e"
    s3_client.create_bucket(Bucket=bucket)
    expected = {}
    for path in digits_webdataset.paths:
        s3_client.put_object(Bucket=bucket, Key=f"wds/{path.name}", Body=path.read_bytes())
        expected[path.stem] = good(digits_webdataset.samples[path.name])
    corrupt, bad = corrupt_shard_samples()
    s3_client.put_object(Bucket=bucket, Key="wds/00003.tar", Body=webdataset_bytes(corrupt))
    expected["00003"] = good(corrupt, bad)
    cut = digits_samples(6, size=32, offset=200)
    s3_client.put_object(Bucket=bucket, Key="wds/00004.tar", Body=truncated_tar(cut, cut_in_sample=3))
    expected["00004"] = good(cut[:3])  # a truncated download: the rows before the damage, flagged
    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    cfg = cache_config([f"s3://{bucket}/wds/*.tar"], f"s3://{bucket}/cache", teacher_files,
                       endpoint=s3_server, tracking_uri=tracking_uri)
    received = []  # everything the driver's committer is handed

    class Recording(job.ShardCommitter):
        def add(self, parts):
            received.append(parts)
            super().add(parts)

    original, job.ShardCommitter = job.ShardCommitter, Recording
    try:
        report = run(cfg)
    finally:
        job.ShardCommitter = original
    fs = s3_filesystem(cfg.s3)
    return SimpleNamespace(cfg=cfg, report=report, fs=fs, root=f"{bucket}/cache", bucket=bucket,
                           expected=expected, bad_keys=bad, tracking_uri=tracking_uri, whole_00004=cut,
                           received=received)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_s3_webdataset_every_key_and_view_once_with_teacher_tokens(s3_cache, teacher_files):
    report = s3_cache.report
    assert sorted(report["committed"]) == sorted(s3_cache.expected) and report["incomplete"] == []
    manifest, tables = read_shards(s3_cache.fs, s3_cache.root)
    assert manifest.settings.grid == [8, 8] and manifest.settings.token_shape == [65, 32]
    assert manifest.settings.teacher["fingerprint"] == teacher_files.reference.weights_fingerprint()
    assert manifest.settings.pixel_format == "jpeg" and manifest.settings.token_codec == "float16"  # defaults
    codec = load_codec(s3_cache.fs, s3_cache.root, manifest)
    for name, samples in s3_cache.expected.items():
        check_rows(tables[name], samples, teacher_files.reference, codec)
        assert manifest.shards[name].rows == NUM_VIEWS * len(samples) == tables[name].num_rows
    images = sum(len(s) for s in s3_cache.expected.values())
    assert report["summary"]["images"] == images and report["summary"]["views"] == NUM_VIEWS * images


@pytest.mark.ray
def test_the_driver_receives_part_metadata_only(s3_cache):
    """No pixel or token byte reaches the driver: it gets one small row per part file written."""
    received = s3_cache.received
    assert received and all(t.schema == PART_SCHEMA for t in received)
    views = s3_cache.report["summary"]["views"]
    parts = sum(t.num_rows for t in received)
    assert sum(t.column("rows").to_numpy().sum() for t in received) == views
    assert sum(t.nbytes for t in received) < 400 * parts  # ~ a file name and a checksum per part
    token_bytes = 65 * 32 * 2 * views
    assert sum(t.nbytes for t in received) < token_bytes / 20


@pytest.mark.ray
def test_s3_corrupt_images_are_skipped_and_counted(s3_cache):
    manifest = load_manifest(s3_cache.fs, s3_cache.root)
    corrupt = manifest.shards["00003"]
    assert (corrupt.images, corrupt.skipped) == (3, 3)
    assert sorted(e.split(":")[0] for e in corrupt.errors) == sorted(s3_cache.bad_keys)
    truncated = manifest.shards["00004"]
    assert truncated.images == 3 and any("truncated" in e for e in truncated.errors)
    assert "truncated" in truncated.read_error  # the manifest says the shard is not the whole input
    assert all(manifest.shards[n].read_error is None for n in ("00000", "00001", "00002", "00003"))
    assert all(manifest.shards[n].skipped == 0 for n in ("00000", "00001", "00002"))
    assert s3_cache.report["summary"]["skipped"] == 3
    assert s3_cache.report["partial"] == ["00004"] and s3_cache.report["summary"]["shards_partial"] == 1


@pytest.mark.ray
def test_s3_manifest_checksums_match_objects_and_hold_no_credentials(s3_cache, s3_client):
    manifest = load_manifest(s3_cache.fs, s3_cache.root)
    listed = []
    for record in manifest.shards.values():
        for part in record.parts:
            body = s3_client.get_object(Bucket=s3_cache.bucket, Key=f"cache/{part.file}")["Body"].read()
            assert (hashlib.sha256(body).hexdigest(), len(body)) == (part.sha256, part.bytes)
            listed.append(f"cache/{part.file}")
    objects = s3_client.list_objects_v2(Bucket=s3_cache.bucket, Prefix="cache/shards/").get("Contents", [])
    assert sorted(o["Key"] for o in objects) == sorted(listed)  # no part file the manifest does not list
    text = s3_client.get_object(Bucket=s3_cache.bucket, Key="cache/manifest.json")["Body"].read().decode()
    assert SECRET not in text and FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"] not in text
    leftovers = s3_client.list_objects_v2(Bucket=s3_cache.bucket, Prefix="cache/_tmp/").get("KeyCount", 0)
    assert leftovers == 0


@pytest.mark.ray
def test_s3_run_is_tracked_in_mlflow_without_secrets(s3_cache):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=s3_cache.tracking_uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "uta-cache"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    params, metrics = mlrun.data.params, mlrun.data.metrics
    assert mlrun.info.run_name == "cache-cache"  # named after the output folder, not at random
    assert mlrun.data.tags["mlflow.source.name"] == "pipelines/cache_teacher.py"
    assert params["output.token_codec"] == "float16" and params["s3.endpoint_url"] == s3_cache.cfg.s3.endpoint_url
    assert metrics["images"] == s3_cache.report["summary"]["images"] and metrics["images_per_s"] > 0
    assert all(SECRET not in str(v) for v in params.values())
    manifest_path = client.download_artifacts(mlrun.info.run_id, "manifest.json")
    manifest = load_manifest(s3_cache.fs, s3_cache.root)
    assert json.loads(Path(manifest_path).read_text())["settings_hash"] == manifest.settings_hash
    # its data: the input shards it read, the cache it wrote (an output dataset on the s3:// URI)
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} | {"source": d.dataset.source}
              for d in mlrun.inputs.dataset_inputs}
    assert inputs["input shards"]["mlflow.data.context"] == "training"
    cache = inputs["teacher cache"]
    assert cache["mlflow.data.context"] == "output" and cache["settings_hash"] == manifest.settings_hash
    assert cache["shards"] == str(len(manifest.shards)) and s3_cache.cfg.output.path.rstrip("/") in cache["source"]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_read_parquet_of_the_manifests_parts_restores_tokens(s3_cache, ray_local):
    _, _, manifest, paths = open_cache(s3_cache.cfg.output.path, s3_cache.cfg.s3)
    ds = ray_local.data.read_parquet(paths, filesystem=s3_cache.fs)
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    pixels_BHW3, tokens_BTD = read_cache_rows(batch, load_codec(s3_cache.fs, s3_cache.root, manifest))
    assert tokens_BTD.shape == (8, 65, 32)
    assert pixels_BHW3.shape == (8, 32, 32, 3) and pixels_BHW3.dtype == torch.uint8
    assert tokens_BTD.dtype == torch.float32


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_s3_rerun_redoes_the_deleted_shard_and_the_partially_read_one(s3_cache, s3_client, teacher_files):
    """Runs last among the S3 tests: it changes the cache. The truncated input is downloaded again
    (whole) before the rerun, which reads it again because its manifest record has a read_error."""
    before = load_manifest(s3_cache.fs, s3_cache.root)
    s3_client.delete_object(Bucket=s3_cache.bucket, Key=f"cache/{before.shards['00001'].parts[-1].file}")
    s3_client.put_object(Bucket=s3_cache.bucket, Key="wds/00004.tar", Body=webdataset_bytes(s3_cache.whole_00004))
    report = run(s3_cache.cfg)
    assert sorted(report["committed"]) == sorted(report["redone"]) == ["00001", "00004"]
    assert report["partial"] == [] and report["incomplete"] == []
    assert sorted(report["already_done"]) == sorted(set(s3_cache.expected) - {"00001", "00004"})
    after, tables = read_shards(s3_cache.fs, s3_cache.root)
    for name in set(s3_cache.expected) - {"00001", "00004"}:
        assert after.shards[name] == before.shards[name]  # untouched: same commit time and checksum
    assert after.shards["00001"].committed_at > before.shards["00001"].committed_at
    codec = load_codec(s3_cache.fs, s3_cache.root, after)
    check_rows(tables["00001"], s3_cache.expected["00001"], teacher_files.reference, codec)
    assert after.shards["00004"].read_error is None and after.shards["00004"].images == 6
    check_rows(tables["00004"], good(s3_cache.whole_00004), teacher_files.reference, codec)


# --------------------------------------------------------------------- local disk
@pytest.fixture(scope="module")
def local_cache(ray_local, digits_webdataset, teacher_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "cache"
    cfg = cache_config([digits_webdataset.root / "*.tar"], out, teacher_files, "output.token_codec=int8",
                       "output.pixel_format=png")
    return SimpleNamespace(cfg=cfg, out=out, report=run(cfg))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_local_webdataset_int8_tokens(local_cache, digits_webdataset, teacher_files):
    assert sorted(local_cache.report["committed"]) == ["00000", "00001", "00002"]
    fs = pafs.LocalFileSystem()
    manifest, tables = read_shards(fs, str(local_cache.out))
    assert manifest.settings.token_codec == "int8"
    codec = load_codec(fs, str(local_cache.out), manifest)
    for path in digits_webdataset.paths:
        check_rows(tables[path.stem], good(digits_webdataset.samples[path.name]), teacher_files.reference, codec)
    assert not (local_cache.out / "_tmp").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_lowrank_cache_restores_within_the_cosine_its_basis_states(ray_local, digits_webdataset, teacher_files,
                                                                   tmp_path):
    out = tmp_path / "cache"
    cfg = cache_config([digits_webdataset.root / "*.tar"], out, teacher_files, "output.token_codec=lowrank_int8",
                       "output.token_rank=12", "output.basis_views=40")
    report = run(cfg)
    assert sorted(report["committed"]) == ["00000", "00001", "00002"]
    fs = pafs.LocalFileSystem()
    manifest, tables = read_shards(fs, str(out))
    basis = manifest.token_basis
    assert basis["rank"] == 12 and basis["views"] == 40 and 0.5 < basis["patch_cosine_mean"] <= 1
    codec = load_codec(fs, str(out), manifest)
    assert codec.bytes_per_view == 2 * 32 + 64 * (2 + 12)
    assert report["summary"]["bytes_per_view"] < 2 * 65 * 32  # below the fp16 tokens alone, pixels included
    for path in digits_webdataset.paths:
        table, samples = tables[path.stem], good(digits_webdataset.samples[path.name])
        check_rows(table, samples, teacher_files.reference, codec)
        pixels_BHW3, tokens_BTD = read_cache_rows(table, codec)
        ref = teacher_files.reference
        ref_BTD = ref.encode_tokens(to_model_input(pixels_BHW3, ref.mean, ref.std))
        cos_BN = torch.nn.functional.cosine_similarity(tokens_BTD[:, 1:], ref_BTD[:, 1:], dim=-1)
        assert abs(cos_BN.mean().item() - basis["patch_cosine_mean"]) < 0.02  # what the manifest states holds
    (out / "token_basis.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="token basis"):
        load_codec(fs, str(out), manifest)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_local_rerun_with_everything_committed_does_nothing(local_cache):
    before = snapshot(local_cache.out)
    report = run(local_cache.cfg)
    assert report["committed"] == [] and sorted(report["already_done"]) == ["00000", "00001", "00002"]
    assert snapshot(local_cache.out) == before


@pytest.mark.parametrize(
    "override, changed",
    [("num_views=3", "views.num_views: 2 -> 3"),
     ("output.token_codec=float16", "token_codec: 'int8' -> 'float16'"),
     ("views.seed=1", "views.seed: 0 -> 1"),
     ("other_weights", "teacher.fingerprint")],
)
@pytest.mark.ray
def test_rerun_with_other_settings_is_refused_and_writes_nothing(local_cache, teacher_files, override, changed):
    before = snapshot(local_cache.out)
    extra = f"teacher.pretrained={teacher_files.other_weights}" if override == "other_weights" else override
    cfg = cache_config(local_cache.cfg.input.paths, local_cache.out, teacher_files, "output.token_codec=int8",
                       "output.pixel_format=png", extra)
    with pytest.raises(CacheMismatchError, match="other settings") as err:
        plan_cache(cfg)
    assert changed in str(err.value)
    assert snapshot(local_cache.out) == before


# --------------------------------------------------------------------- image folder
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_image_folder_labels_from_class_folders(ray_local, teacher_files, tmp_path):
    root = tmp_path / "folder"
    expected: dict[str, dict[str, Sample]] = {}
    class_names = [f"digit_{d}" for d in range(3)]
    for sample in digits_samples(12, size=32):
        if sample.label >= 3:
            continue
        cls = class_names[sample.label]
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{sample.key}.png").write_bytes(sample.image)
        sample.key = f"{cls}/{sample.key}"  # keys are relative paths without extension
        sample.caption = None
        expected.setdefault(cls, {})[sample.key] = sample
    (root / "digit_1" / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "cache"
    report = run(cache_config([root], out, teacher_files))
    assert sorted(report["committed"]) == class_names
    manifest, tables = read_shards(pafs.LocalFileSystem(), str(out))
    assert manifest.class_names == class_names
    codec = load_codec(pafs.LocalFileSystem(), str(out), manifest)
    for cls, samples in expected.items():
        check_rows(tables[cls], samples, teacher_files.reference, codec)
    assert manifest.shards["digit_1"].skipped == 1 and "broken" in manifest.shards["digit_1"].errors[0]
    assert report["summary"]["skipped"] == 1


# --------------------------------------------------------------------- fail fast
def _run_main(tmp_path, teacher_files, *overrides) -> int:
    return main([
        f"teacher.arch={teacher_files.arch}", f"teacher.pretrained={teacher_files.weights}",
        "views.size=32", "ray.progress_bars=false", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ])


@pytest.mark.parametrize("pattern, message", [
    ("missing/*.tar", "does not exist"), ("missing.tar", "does not exist"), ("empty/*.tar", "matched no files"),
])
def test_missing_local_input_fails_fast_and_writes_nothing(tmp_path, teacher_files, capsys, pattern, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "cache"
    code = _run_main(tmp_path, teacher_files, f"input.paths={tmp_path / pattern}", f"output.path={out}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(tmp_path) in err[0]
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_buckets_fail_fast_and_write_nothing(s3_server, s3_client, digits_webdataset, teacher_files,
                                                    tmp_path, capsys):
    buckets = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    objects = {b: s3_client.list_objects_v2(Bucket=b).get("KeyCount", 0) for b in buckets}
    cases = [
        (["input.paths=s3://no-such-input-bucket/wds/*.tar", f"output.path={tmp_path / 'cache'}"],
         "no-such-input-bucket"),
        ([f"input.paths={digits_webdataset.root}", "output.path=s3://no-such-output-bucket/cache"],
         "no-such-output-bucket"),
    ]
    for overrides, bucket in cases:
        code = _run_main(tmp_path, teacher_files, *overrides, f"s3.endpoint_url={s3_server}")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"S3 bucket '{bucket}' does not exist" in err[0]
    assert {b["Name"] for b in s3_client.list_buckets()["Buckets"]} == buckets
    assert {b: s3_client.list_objects_v2(Bucket=b).get("KeyCount", 0) for b in buckets} == objects
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def s3_server_with_auth(aws_test_env):
    """A moto server that checks credentials (the fake ones are unknown to it)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_refused_credentials_fail_fast_with_one_clear_message(s3_server_with_auth, digits_webdataset,
                                                             teacher_files, tmp_path, capsys):
    for overrides in (["input.paths=s3://some-bucket/wds/*.tar", f"output.path={tmp_path / 'cache'}"],
                      [f"input.paths={digits_webdataset.root}", "output.path=s3://some-bucket/cache"]):
        code = _run_main(tmp_path, teacher_files, *overrides, f"s3.endpoint_url={s3_server_with_auth}")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert "access to s3://some-bucket was denied" in err[0] and "AWS credentials" in err[0]
        assert SECRET not in err[0] and FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"] not in err[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.timeout(120)  # a retry loop that never gives up fails here instead of hanging
def test_unreachable_endpoint_is_a_storage_error_naming_it(aws_test_env, teacher_files, tmp_path):
    port = free_port()  # closed again: nothing listens there
    cfg = cache_config(["s3://bucket/wds/*.tar"], tmp_path / "cache", teacher_files,
                       endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=f"cannot reach http://127.0.0.1:{port}"):
        plan_cache(cfg)


# --------------------------------------------------------------------- command line
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_smoke_test_command(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["--smoke-test", "ray.progress_bars=false"]) == 0
    out = capsys.readouterr().out
    assert "shards committed / already done / incomplete  2 / 0 / 0" in out
    (workdir,) = tmp_path.glob("uta-cache-smoke-*")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"  # it says where its MLflow runs are, and how to open them
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert "http://127.0.0.1:5000/#/experiments/" in out and "?workflowType=machine_learning" in out
    assert (workdir / "mlflow.db").is_file()
    manifest = load_manifest(pafs.LocalFileSystem(), str(workdir / "cache"))
    assert sum(r.rows for r in manifest.shards.values()) == 2 * 12 * NUM_VIEWS


def test_default_command_without_input_explains_what_is_missing(capsys):
    assert main([]) == 2
    assert "input.paths=" in capsys.readouterr().err

"""Ordinary faults against what we read back and what we write, with real files and real processes:
a damaged cache (a flipped byte, a truncated part, a deleted part), a diverged run (a NaN loss),
relative paths typed from another directory. Each gives one line that names what and how to fix
it, nothing trained on damaged data, nothing of a NaN saved, and a rerun that completes with
every (key, view) exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from faults import Fault
from helpers import pretrain_config, pretrain_in_process, samples_seen, write_cache_in_process

from pipelines.lib.pretrain.job import plan_pretrain
from pipelines.lib.train.backends import InProcess
from pipelines.lib.train.launch import resolve_paths, run_folder
from uta_core.cache.format import load_manifest
from uta_core.cache.verify import DamagedCacheError
from uta_core.data.storage import filesystem_for
from uta_core.errors import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(pretrain_ws):
    return pretrain_ws


def cache_copy(ws, tmp_path: Path) -> tuple[Path, list]:
    """A copy of the test cache and its manifest's (shard name, part record) in order."""
    cache = tmp_path / "cache"
    shutil.copytree(ws.cache, cache)
    fs, root = filesystem_for(str(cache), None)
    manifest = load_manifest(fs, root)
    return cache, [(name, part) for name in sorted(manifest.shards) for part in manifest.shards[name].parts]


def cached_run(ws, cache: Path, name: str, *extra: str):
    return resolve_paths(pretrain_config(ws, name, "cache", f"data.cache={cache}", "train.max_steps=6",
                                         "data.cache_views=all", *extra))


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------- a damaged cache
def test_a_flipped_byte_stops_training_at_that_part_and_the_verified_rerun_redoes_its_shard(ws, tmp_path):
    cache, parts = cache_copy(ws, tmp_path)
    shard, part = parts[len(parts) // 2]
    path = cache / part.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot: the same size, other bytes
    path.write_bytes(bytes(data))

    with pytest.raises(DamagedCacheError) as err:  # sizes match: training starts
        pretrain_in_process(cached_run(ws, cache, "flipped"))
    assert f"shard {shard}, part {part.file}: its bytes differ from the xxh3-128" in one_line(err.value)
    assert "rerun the cache job on the same output.path" in str(err.value)

    # The cache job's rerun: sizes alone pass this part; output.verify=true finds and redoes its shard.
    from pipelines.lib.cache.config import CacheConfig
    from uta_core.config import load_config

    cfg = load_config(CacheConfig, None, [
        f"input.paths={ws.train}", f"output.path={cache}", f"teacher.arch={ws.arch}",
        f"teacher.pretrained={ws.weights}", "teacher.precision=fp32", "views.size=32", "num_views=2",
        "ray.images_per_block=16", "tracking.enabled=false", "output.pixel_format=png", "output.verify=true"])
    write_cache_in_process(cfg)
    fs, root = filesystem_for(str(cache), None)
    redone = load_manifest(fs, root)
    assert [p.sha256 for p in redone.shards[shard].parts] != [part.sha256]  # rewritten (new part names)
    assert redone.shards[shard].rows == 2 * redone.shards[shard].images  # every (key, view) of it, once
    cfg = cached_run(ws, cache, "flipped-rerun")
    job, plan = plan_pretrain(cfg, run_folder(cfg), InProcess())  # the whole cache checks out again
    assert plan.sources.total_rows == sum(r.rows for r in redone.shards.values())


def test_a_cache_written_before_parts_had_an_xxh3_is_checked_by_its_sha256(tmp_path):
    import hashlib

    import pyarrow.fs as pafs

    from uta_core.cache.verify import read_part

    part = tmp_path / "part.parquet"
    part.write_bytes(b"parquet bytes" * 100)
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    fs = pafs.LocalFileSystem()
    assert read_part(fs, str(part), part.stat().st_size, "c: shard s, part p", sha256=digest).size == 1300
    part.write_bytes(b"parquet bytez" * 100)
    with pytest.raises(DamagedCacheError, match="c: shard s, part p: its bytes differ from the sha256"):
        read_part(fs, str(part), part.stat().st_size, "c: shard s, part p", sha256=digest)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"part {file}: [\d,]+ bytes, the manifest records [\d,]+; rerun the cache job"),
    ("delete", r"part {file}: missing; rerun the cache job"),
])
def test_a_truncated_or_deleted_part_stops_the_run_before_any_worker_starts(ws, tmp_path, damage, message):
    cache, parts = cache_copy(ws, tmp_path)
    shard, part = parts[-1]
    path = cache / part.file
    if damage == "truncate":  # an interrupted copy
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    cfg = cached_run(ws, cache, f"damaged-{damage}")
    with pytest.raises(DamagedCacheError, match=message.format(file=part.file)) as err:
        pretrain_in_process(cfg)
    assert f"shard {shard}" in one_line(err.value)
    assert not (Path(cfg.run.storage_path) / cfg.run.name).exists()  # nothing written


# --------------------------------------------------------------------- a diverged run
def test_a_nan_loss_stops_the_run_saves_nothing_of_it_and_the_rerun_resumes_from_the_last_checkpoint(ws, tmp_path):
    cfg = resolve_paths(pretrain_config(ws, "diverges", "cache", f"data.cache={ws.cache}", "train.max_steps=6"))
    with pytest.raises(NonFiniteLoss) as err:
        pretrain_in_process(cfg, Fault(step=3, kind="nan", once=tmp_path / "struck"))
    text = one_line(err.value)
    assert "loss nan is not finite in step 3 of run diverges" in text and "last checkpoint: step 2" in text
    assert "optim.lr=" in text and "train.skip_nonfinite_steps" in text
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_0000002"]  # no NaN step saved
    assert not (run_dir / "export").exists()
    client = mlflow.MlflowClient(ws.mlflow)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              f"tags.mlflow.runName = '{cfg.run.name}'")
    assert [r.info.status for r in runs] == ["FAILED"]

    resumed = pretrain_in_process(cfg)  # the rerun resumes at step 2
    ids = samples_seen(str(ws.root / "runs"), "diverges")
    assert resumed["steps"] == 6 and len(ids) == len(set(ids)) == 6 * 8  # every row of the 6 steps, once
    assert all(v == v for h in resumed["history"] for v in h.values())


def test_a_bounded_number_of_nonfinite_steps_may_be_skipped(ws, tmp_path):
    cfg = resolve_paths(pretrain_config(ws, "skips", "cache", f"data.cache={ws.cache}", "train.max_steps=4",
                                        "train.skip_nonfinite_steps=1"))
    report = pretrain_in_process(cfg, Fault(step=2, kind="nan", once=tmp_path / "struck"))
    assert report["steps"] == 4 and report["metrics"]["skipped_steps"] == 1
    assert all(v == v for h in report["history"] for v in h.values())  # no NaN logged


# --------------------------------------------------------------------- paths as typed
def test_relative_paths_resolve_against_the_directory_the_command_runs_from(tmp_path):
    config = (ROOT / "configs" / "pretrain_local.yaml").read_text().replace("name: uta-local", "name: typed-here")
    (tmp_path / "configs").mkdir()  # a configs/ of the user's, not the checkout's
    (tmp_path / "configs" / "pretrain_local.yaml").write_text(config.replace("typed-here", "users-configs"))
    # configs/pretrain_local.yaml is the user's here (the checkout has one too); the script is the checkout's.
    out = subprocess.run([str(ROOT / "uta"), "python", "pipelines/pretrain.py", "--config",
                          "configs/pretrain_local.yaml", "--print-config"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: users-configs" in out.stdout


# --------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs (where this machine lets us mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_keeps_the_committed_shards_and_the_rerun_completes(ws, small_disk):
    from pipelines.lib.cache.config import CacheConfig
    from uta_core.cache.verify import check_part_sizes
    from uta_core.config import load_config
    from uta_core.errors import DiskFull, is_disk_full

    cache = small_disk / "cache"
    cfg = load_config(CacheConfig, None, [
        f"input.paths={ws.train}", f"output.path={cache}", f"teacher.arch={ws.arch}",
        f"teacher.pretrained={ws.weights}", "teacher.precision=fp32", "views.size=32", "num_views=2",
        "ray.images_per_block=16", "tracking.enabled=false", "output.pixel_format=png", "output.part_mb=0.05"])
    with pytest.raises(OSError) as err:
        write_cache_in_process(cfg)
    assert is_disk_full(err.value)
    line = one_line(DiskFull.of(err.value))
    assert line.startswith("no space left on the device") and "what was committed" in line
    fs, root = filesystem_for(str(cache), None)
    committed = load_manifest(fs, root)
    assert committed is not None
    check_part_sizes(fs, root, str(cache), committed.shards)  # every committed part whole
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    write_cache_in_process(cfg)
    done = load_manifest(fs, root)
    assert len(done.shards) == 4 and all(s.rows == 2 * s.images for s in done.shards.values())


# --------------------------------------------------------------------- what a dead attempt leaves
def test_an_mlflow_run_left_running_ends_killed_and_a_torn_ray_snapshot_is_set_aside(ws, tmp_path, caplog):
    from uta_core.run.folder import RAY_SNAPSHOT, RunFolder

    cfg = resolve_paths(pretrain_config(ws, "orphan", "cache", f"data.cache={ws.cache}", "train.max_steps=2",
                                        f"run.storage_path={tmp_path / 'runs'}"))
    folder = tmp_path / "runs" / "orphan"
    folder.mkdir(parents=True)
    client = mlflow.MlflowClient(ws.mlflow)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment) or client.get_experiment(
        client.create_experiment(cfg.tracking.experiment))
    orphan = client.create_run(experiment.experiment_id).info.run_id  # a driver SIGKILLed mid-run left it RUNNING
    (folder / "mlflow_run.json").write_text(json.dumps({"run_id": orphan, "tracking_uri": ws.mlflow}))
    (folder / RAY_SNAPSHOT).write_bytes(b"")  # a full disk while Ray Train wrote it
    RunFolder(str(folder), cfg.s3).set_aside_damaged_ray_snapshot()
    assert not (folder / RAY_SNAPSHOT).exists() and list(folder.glob(f"{RAY_SNAPSHOT}.damaged-*"))
    assert "checkpoint snapshot was empty" in caplog.text
    report = pretrain_in_process(cfg)
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(report["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.ray
def test_the_error_behind_a_failed_ray_worker_is_the_one_line_the_command_prints(ray_local):
    """A damaged part read by a Ray task of a Ray Train worker reaches the driver wrapped twice (the
    task's error, the worker group's); the command finds it and prints its line, not the traceback."""
    from ray.train import WorkerGroupError

    from uta_core.errors import cannot_continue

    def read_damaged():
        raise DamagedCacheError("cache c: shard s, part p: missing; rerun the cache job")

    with pytest.raises(Exception) as err:
        ray_local.get(ray_local.remote(read_damaged).options(max_retries=0).remote())
    group = WorkerGroupError("rank 0 failed", {0: err.value})
    assert str(cannot_continue(group)) == "cache c: shard s, part p: missing; rerun the cache job"
    assert cannot_continue(WorkerGroupError("rank 0 failed", {0: RuntimeError("other")})) is None

"""Outputs with one owner, tried as an adversary would, with real processes and files: a checkpoint
that would run code, reruns that would delete committed work, two jobs racing for one stale lease,
a paused owner that wakes up after another job took over, damaged manifests, a run folder's MLflow
record pointing elsewhere, a sweep folder nobody vouches for, and what `ray job submit` uploads.

Each trial must give: nothing executes from a data file, nothing committed is lost, exactly one
owner writes at any moment and a deposed owner stops before its next write, and every damaged
input is one line, never a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_digits_webdataset
from helpers import pretrain_config, pretrain_in_process, write_cache_in_process

from pipelines.lib.cache.config import CacheConfig
from uta_core.cache.format import MANIFEST_NAME, load_manifest
from uta_core.cache.verify import check_part_sizes, part_sizes
from uta_core.checkpoint import RECORD_FILE, STATE_FILE, UnsafeCheckpoint, checkpoint_files
from uta_core.config import load_config
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.lease import LEASE_DIR, Lease, LeaseConfig, LeaseLost, OutputInUse
from uta_core.run.folder import checkpoint_dir_name

ROOT = Path(__file__).resolve().parents[1]
FAST = LeaseConfig(beat_s=0.05, stale_s=0.3)


@pytest.fixture(scope="module")
def ws(pretrain_ws):
    return pretrain_ws


class Opens:
    """Unpickled, it opens (creates) a file: what a hostile ``state.pt`` would do with a shell instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def plant_hostile_checkpoint(folder: Path, marker: Path) -> None:
    """A checkpoint whose state would create ``marker`` when unpickled, with a record that matches it:
    whoever can write the folder can write both."""
    real = torch.load(folder / STATE_FILE, weights_only=True)
    real["meta"] = Opens(marker)
    files = checkpoint_files(real, real["position"]["step"])
    buf = io.BytesIO()
    torch.save(real, buf)
    record = json.loads(files[RECORD_FILE])
    record["files"][STATE_FILE] = {"bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (folder / STATE_FILE).write_bytes(buf.getvalue())
    (folder / RECORD_FILE).write_text(json.dumps(record))


JOBS = """
import sys
from pipelines import evaluate, export, pretrain
for name, job, argv in [("export", export, sys.argv[1].split("|")), ("evaluate", evaluate, sys.argv[2].split("|")),
                        ("init_from", pretrain, sys.argv[3].split("|"))]:
    print(f"== {name} rc={job.main(argv)}", file=sys.stderr, flush=True)
"""


def test_a_checkpoint_that_would_run_code_is_refused_by_every_reader_and_runs_nothing(ws, tmp_path):
    cfg = pretrain_config(ws, "hostile", "cache", "train.max_steps=2", f"run.storage_path={tmp_path / 'runs'}")
    pretrain_in_process(cfg)
    folder = tmp_path / "runs" / "hostile" / checkpoint_dir_name(2)
    marker = tmp_path / "ran-code"
    plant_hostile_checkpoint(folder, marker)
    # export.py, evaluate.py and pretrain.py init_from=: one process, each job's command line in turn.
    export = f"model={folder}|output={tmp_path / 'exported'}"
    evaluate = (f"zeroshot|model={folder}|input.paths={ws.heldout}|classifier_path={ws.classifier}"
                "|tracking.enabled=false")
    start = "|".join([f"init_from={folder}", *[f"{k}={v}" for k, v in (
        ("data.cache", ws.cache), ("teacher.arch", "unused"), ("run.storage_path", tmp_path / "runs2"),
        ("student.variant", "nano"), ("student.img_size", 32), ("student.patch_size", 4), ("student.out_dim", 32),
        ("data.views.size", 32), ("tracking.enabled", "false"))]])
    out = subprocess.run([sys.executable, "-c", JOBS, export, evaluate, start], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    codes = {line.split()[1]: line.split("rc=")[1] for line in out.stderr.splitlines() if line.startswith("== ")}
    assert codes == {"export": "1", "evaluate": "1", "init_from": "1"}, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, out.stderr[-3000:]
    for line in errors:
        assert f"{folder}/state.pt holds objects other than tensors and plain data (io.open)" in line
        assert "nothing in it ran" in line
    assert not (tmp_path / "exported").exists() and not (tmp_path / "runs2").exists()

    # The same file as the run's newest checkpoint: the rerun refuses it (nothing resumes, nothing runs).
    with pytest.raises(UnsafeCheckpoint, match="holds objects other than tensors"):
        pretrain_in_process(pretrain_config(ws, "hostile", "cache", "train.max_steps=4",
                                            f"run.storage_path={tmp_path / 'runs'}"))
    assert not marker.exists()


# --------------------------------------------------------------------- reruns keep committed work
def cache_config(ws, shards: Path, out: Path, *paths: str, extra: tuple[str, ...] = ()) -> CacheConfig:
    return load_config(CacheConfig, None, [
        f"input.paths={json.dumps([*paths] or [str(shards)])}", f"output.path={out}", f"teacher.arch={ws.arch}",
        f"teacher.pretrained={ws.weights}", "teacher.precision=fp32", "views.size=32", "num_views=2",
        "ray.images_per_block=4", "tracking.enabled=false", "output.manifest_interval_s=0", *extra])


def listed_parts(out: Path) -> set[str]:
    manifest = load_manifest(*filesystem_for(str(out), S3Options()))
    return {str(out / p.file) for rec in manifest.shards.values() for p in rec.parts}


def test_a_narrower_rerun_keeps_every_committed_shard_and_never_follows_a_link(ws, tmp_path, caplog):
    shards = write_digits_webdataset(tmp_path / "shards", shards=4, per_shard=4).root
    out = tmp_path / "cache"
    write_cache_in_process(cache_config(ws, shards, out))
    before = listed_parts(out)
    assert len(load_manifest(*filesystem_for(str(out), S3Options())).shards) == 4

    outside = tmp_path / "elsewhere"  # someone's files, linked into the cache's shards/ folder
    outside.mkdir()
    for i in range(3):
        (outside / f"sentinel-{i}.parquet").write_text("keep me")
    (out / "shards" / "linked").symlink_to(outside, target_is_directory=True)

    # A narrower glob: today's inputs name 2 of the 4 committed shards.
    caplog.clear()
    write_cache_in_process(cache_config(ws, shards, out, f"{shards}/0000[01].tar"))
    manifest = load_manifest(*filesystem_for(str(out), S3Options()))
    assert sorted(manifest.shards) == ["00000", "00001", "00002", "00003"]
    assert listed_parts(out) == before  # every committed part still there
    sizes, links = part_sizes(*filesystem_for(str(out), S3Options()))
    assert set(sizes) == before and links == [str(out / "shards" / "linked")]  # the disk and the manifest agree
    check_part_sizes(*filesystem_for(str(out), S3Options()), str(out), manifest.shards)
    assert sorted(p.name for p in outside.iterdir()) == [f"sentinel-{i}.parquet" for i in range(3)]
    assert "kept 2 committed shard(s) that today's inputs do not name (00002, 00003)" in caplog.text
    assert "is a symbolic link; the cache neither follows nor deletes it" in caplog.text


# --------------------------------------------------------------------- one owner at a time
CONTENDER = """
import sys, time
from uta_core.data.storage import S3Options
from uta_core.lease import Lease, LeaseConfig
held = None
for line in sys.stdin:
    words = line.split()
    if words[0] == "go":
        uri, endpoint, delay = words[1], words[2] if words[2] != "-" else None, float(words[3])
        time.sleep(delay)
        lease = Lease(uri, S3Options(endpoint_url=endpoint), "output.path", LeaseConfig(beat_s=0.05, stale_s=0.3))
        try:
            lease.acquire()
            lease.check("a commit")
            held = lease
            print("won", flush=True)
        except Exception as err:
            print(type(err).__name__, str(err).splitlines()[0] if str(err) else "", flush=True)
    elif words[0] == "release" and held is not None:
        held.release()
        held = None
        print("released", flush=True)
"""


def stale_record(generation: int) -> bytes:
    """The lease of a job on another machine that stopped (its record no longer changes)."""
    return json.dumps({"generation": generation, "owner": "gone", "host": "another-host", "pid": 1,
                       "command": "cache_teacher.py", "beat": 7, "beat_s": 0.05}).encode()


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.timeout(240)
def test_two_jobs_racing_for_one_stale_lease_give_exactly_one_owner_every_round(where, tmp_path, s3_server,
                                                                                s3_client, s3_bucket):
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    rounds = 30 if where == "local" else 12
    outcomes = []
    try:
        for i in range(rounds):
            key = f"race-{i}"
            if where == "local":
                uri, endpoint = str(tmp_path / key), "-"
                (tmp_path / key / LEASE_DIR).mkdir(parents=True)
                (tmp_path / key / LEASE_DIR / "000000000001.json").write_bytes(stale_record(1))
            else:
                uri, endpoint = f"s3://{s3_bucket}/{key}", s3_server
                s3_client.put_object(Bucket=s3_bucket, Key=f"{key}/{LEASE_DIR}/000000000001.json",
                                     Body=stale_record(1))
            delays = (0.0, 0.0) if i % 2 == 0 else (0.0, 0.15 * (i % 3))  # the same moment, or not
            for proc, delay in zip(procs, delays):
                proc.stdin.write(f"go {uri} {endpoint} {delay}\n")
                proc.stdin.flush()
            answers = [proc.stdout.readline().strip() for proc in procs]
            outcomes.append(answers)
            for proc, answer in zip(procs, answers):
                if answer == "won":
                    proc.stdin.write("release\n")
                    proc.stdin.flush()
                    assert proc.stdout.readline().strip() == "released"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert all(sorted(a.split(" ", 1)[0] for a in answers) == ["OutputInUse", "won"] for answers in outcomes), outcomes


def test_a_lease_record_of_another_version_is_taken_over_only_once_it_stops_changing(tmp_path):
    folder = tmp_path / "out" / LEASE_DIR
    folder.mkdir(parents=True)
    record = {"generation": 1, "owner": "other-version", "host": "another-host", "beat": 0, "future_field": [1]}
    (folder / "000000000001.json").write_text(json.dumps(record))  # no pid, command or beat_s; one unknown

    def keep_beating(stop: threading.Event) -> None:  # its owner is alive and renews it
        while not stop.wait(0.05):
            record["beat"] += 1
            (folder / "000000000001.json").write_text(json.dumps(record))

    stop = threading.Event()
    beater = threading.Thread(target=keep_beating, args=(stop,))
    beater.start()
    try:
        with pytest.raises(OutputInUse, match="renewed its lease just now"):
            Lease(str(tmp_path / "out"), None, "output.path", LeaseConfig(beat_s=0.1, stale_s=1.0)).acquire()
    finally:
        stop.set()
        beater.join()
    start = time.monotonic()
    with Lease(str(tmp_path / "out"), None, "output.path", LeaseConfig(beat_s=0.1, stale_s=0.5)).held():
        assert time.monotonic() - start >= 0.5  # unchanged for stale_s on this clock, then taken over
    assert not folder.exists() or not list(folder.iterdir())


def test_the_heartbeat_survives_transient_errors_and_a_deposed_owner_is_stopped_naming_the_new_one(tmp_path):
    uri = str(tmp_path / "out")
    first = Lease(uri, None, "output.path", LeaseConfig(beat_s=0.05, stale_s=0.5))
    first.record.host, first.record.machine = "node-2", "another-boot/pid:[1]"  # a job on another machine
    first.acquire()
    real, failures = first.store.replace, []

    def flaky(generation, payload):
        if len(failures) < 3:  # the storage away for a moment
            failures.append(1)
            raise OSError("connection reset by peer")
        real(generation, payload)

    first.store.replace = flaky
    time.sleep(0.6)
    assert len(failures) == 3 and not first.lost
    first.check("a commit")  # still the owner
    assert json.loads((tmp_path / "out" / LEASE_DIR / "000000000001.json").read_text())["beat"] > 0
    first._stop.set()  # frozen: no more heartbeats (a SIGSTOPped process, a node under memory pressure)
    first._thread.join()
    second = Lease(uri, None, "output.path", LeaseConfig(beat_s=0.05, stale_s=0.3))
    second.acquire()  # another machine's job, its record unchanged for stale_s: taken over
    try:
        with pytest.raises(LeaseLost) as err:
            first.check("manifest.json")
        line = str(err.value)
        assert "\n" not in line and "lost its lease (generation 1)" in line and f"(pid {os.getpid()})" in line
        assert "node-2" not in line  # names the new owner, not itself
        assert "without writing manifest.json" in line
        second.check("a commit")
    finally:
        second.release()
        first.release(quiet=True)


def test_a_failing_release_never_hides_the_error_that_stopped_the_job(tmp_path, aws_test_env):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="gone")
    s3 = S3Options(endpoint_url=endpoint, connect_timeout_s=0.5, request_timeout_s=0.5, max_attempts=1)
    with pytest.raises(ValueError, match="the write failed"):
        with Lease("s3://gone/cache", s3, "output.path", LeaseConfig(beat_s=5, stale_s=30)).held():
            server.stop()  # the S3 server gone mid-job
            raise ValueError("the write failed")


PAUSED = """
import sys
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cli import setup_logging, user_error
from uta_core.cache.writer import write_in_process
from uta_core.config import load_config
from uta_core.errors import RunCannotContinue
setup_logging()
try:
    write_in_process(load_config(CacheConfig, None, sys.argv[1:]), 2)
except RunCannotContinue as err:
    sys.exit(user_error(err, code=1))
"""


@pytest.mark.timeout(300)
def test_a_paused_owner_that_wakes_after_a_takeover_writes_nothing_more_and_stops_with_one_line(ws, tmp_path):
    shards = write_digits_webdataset(tmp_path / "shards", shards=10, per_shard=6).root
    out = tmp_path / "cache"
    cfg = cache_config(ws, shards, out, extra=("output.lease.beat_s=0.1", "output.lease.stale_s=1.5"))
    args = [f"{k}={v}" for k, v in [
        ("input.paths", shards), ("output.path", out), ("teacher.arch", ws.arch),
        ("teacher.pretrained", ws.weights), ("teacher.precision", "fp32"), ("views.size", 32), ("num_views", 2),
        ("tracking.enabled", "false"), ("output.manifest_interval_s", 0), ("output.lease.beat_s", 0.1),
        ("output.lease.stale_s", 1.5)]]
    assert cfg.output.lease.stale_s == 1.5

    def committed() -> int:
        try:
            return len(json.loads((out / MANIFEST_NAME).read_text())["shards"])
        except (FileNotFoundError, ValueError):
            return 0

    first = subprocess.Popen([sys.executable, "-c", PAUSED, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while committed() < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-job, past stale_s
        at_pause = committed()
        assert at_pause < 10, "the first job finished before it could be paused"
        second = subprocess.run([sys.executable, "-c", PAUSED, *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=200)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "unchanged for 1.5 s" in second.stderr  # it waited out the silent owner on its own clock
        manifest_after_second = (out / MANIFEST_NAME).read_bytes()
        files_after_second = {p for p in out.rglob("*") if p.is_file()}
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert first.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost its lease (generation 1)" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert (out / MANIFEST_NAME).read_bytes() == manifest_after_second  # the deposed owner saved nothing
    new = {p for p in out.rglob("*") if p.is_file()} - files_after_second
    assert len(new) <= 1 and all("/shards/" in str(p) for p in new), new  # at most the part it was writing
    manifest = load_manifest(*filesystem_for(str(out), S3Options()))
    assert len(manifest.shards) == 10 and all(r.rows == 2 * r.images for r in manifest.shards.values())
    check_part_sizes(*filesystem_for(str(out), S3Options()), str(out), manifest.shards)
    import pyarrow.parquet as pq

    pairs = [kv for p in listed_parts(out) for kv in zip(*pq.read_table(p, columns=["key", "view"]).to_pydict()
                                                         .values())]
    assert len(pairs) == len(set(pairs)) == 10 * 6 * 2  # every (key, view) exactly once


# --------------------------------------------------------------------- damaged manifests, foreign records
@pytest.mark.parametrize("content, message", [
    ("", "manifest.json is empty: a save was cut off or the file was damaged"),
    ("shards-without-rows", "is not a manifest this version reads (shard train-00000: missing field 'rows')"),
])
def test_an_empty_or_foreign_manifest_is_one_line_naming_the_file(ws, tmp_path, capsys, content, message):
    from pipelines import pretrain

    cache = tmp_path / "cache"
    shutil.copytree(ws.cache, cache)
    if content:
        data = json.loads((cache / MANIFEST_NAME).read_text())
        del data["shards"]["train-00000"]["rows"]
        content = json.dumps(data)
    (cache / MANIFEST_NAME).write_text(content)
    code = pretrain.main([f"data.cache={cache}", "data.teacher_mode=cache", "tracking.enabled=false",
                          f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and f"{cache}/{MANIFEST_NAME}" in lines[0] and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_run_folders_mlflow_record_naming_another_server_is_never_contacted(ws, tmp_path, caplog):
    cfg = pretrain_config(ws, "redirected", "cache", "train.max_steps=1", f"run.storage_path={tmp_path / 'runs'}")
    folder = tmp_path / "runs" / "redirected"
    folder.mkdir(parents=True)
    (folder / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": "http://evil.invalid"}))
    pretrain_in_process(cfg)
    assert "names the MLflow store http://evil.invalid" in caplog.text and "(not contacted)" in caplog.text
    assert "could not end its MLflow run" not in caplog.text


# --------------------------------------------------------------------- sweeps
def test_a_sweep_name_that_leaves_its_storage_or_a_folder_nobody_vouches_for_is_refused(ws, tmp_path, capsys):
    from pipelines import sweep

    storage = tmp_path / "sweeps"
    assert sweep.main(["--name", "../escape", "--storage-path", str(storage), "tracking.enabled=false"]) == 2
    assert "--name='../escape' must be a plain folder name" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not storage.exists()

    foreign = storage / "inherited"  # a Tune experiment this project did not write (its state unpickles)
    foreign.mkdir(parents=True)
    marker = tmp_path / "ran-code"
    (foreign / "tuner.pkl").write_bytes(__import__("pickle").dumps(Opens(marker)))
    assert sweep.main(["--name", "inherited", "--storage-path", str(storage), "tracking.enabled=false",
                       "data.teacher_mode=cache", f"data.cache={ws.cache}", "data.views.size=32",
                       "student.img_size=32", "student.patch_size=4", "student.out_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "holds a Ray Tune experiment that this project's sweep 'inherited' did not create" in err
    assert not marker.exists() and "Traceback" not in err


# --------------------------------------------------------------------- what a submitted job uploads
def test_the_package_a_submitted_job_uploads_leaves_weights_exports_checkpoints_and_credentials(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    for name in ("uta_core", "pipelines", "configs"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".rayignore", "pyproject.toml"):
        shutil.copy(ROOT / name, checkout / name)
    planted = ["weights/x.pt", "weights/uta/checkpoints/UTA-B.pt", "exports/uta-l/open_clip_model.safetensors",
               ".env", ".env.production", "configs/secret.pem", "scratch/checkpoint_0000002/state.pt", "model.pth"]
    for rel in planted:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("not for the cluster")
    package = tmp_path / "package.zip"
    create_package(str(checkout), package, include_gitignore=False)  # .rayignore alone must keep them out
    names = set(zipfile.ZipFile(package).namelist())
    assert not [rel for rel in planted if rel in names], names
    assert "uta_core/lease.py" in names and "configs/pretrain_local.yaml" in names

"""Fault trials on a real local Ray, as a cluster meets them: a job's driver SIGKILLed, a
caching job SIGKILLed after some shards (a SIGKILLed training worker: tests/test_pretrain.py,
with its cache and checkpoints on S3). Each ends in one complete result: one MLflow run with
every step, a checkpoint at the last step, a cache with every (key, view) row once (0
duplicates, 0 missing).

The drivers run as separate processes (``python pipelines/NAME.py``), each with its own local
Ray, so a kill hits a real driver; inputs are the ``--smoke-test`` ones (tiny, generated).
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.lib.smoke import cache_overrides, pretrain_overrides
from uta_core.cache.format import MANIFEST_NAME
from uta_core.data.digits import digits_samples

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def start(script: str, args: list[str], log: Path) -> subprocess.Popen:
    """A job's driver in its own process group (its local Ray's processes join it)."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever of its local Ray is left (as a lost head node would)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_driver(proc)
            pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def finish(script: str, args: list[str], log: Path, timeout: float = 300) -> None:
    proc = start(script, args, log)
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            kill_driver(proc)


def the_run(tracking_uri: str, run_name: str):
    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("uta-pretrain")
    runs = client.search_runs([exp.experiment_id], f"tags.`uta.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the resumed run continues the same MLflow run
    return client, runs[0]


def final_state(storage: Path, run_name: str, step: int) -> dict:
    path = storage / run_name / f"checkpoint_{step:07d}" / "state.pt"
    return torch.load(io.BytesIO(path.read_bytes()), weights_only=False)


# --------------------------------------------------------------------- training
@pytest.mark.timeout(500)
def test_a_sigkilled_driver_resumes_on_resubmit_in_the_same_mlflow_run(tmp_path):
    """The driver (and its local Ray) is SIGKILLed after the checkpoint of step 2; the resubmitted
    job resumes from the newest checkpoint and continues the same MLflow run. (A SIGKILLed
    worker: tests/test_pretrain.py, on S3.)"""
    work = tmp_path / "inputs"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    args = [*pretrain_overrides(work), "run.name=faults", "train.max_steps=8", "run.checkpoint_every=2",
            "run.log_every=1", "cluster.num_workers=1"]  # one worker: the trial is about the driver
    log = tmp_path / "job.log"
    proc = start("pretrain.py", args, log)
    wait_for((work / "runs" / "faults" / "checkpoint_0000002" / "state.pt").is_file, proc, log, timeout=300,
             what="the checkpoint of step 2")
    kill_driver(proc)
    _, run = the_run(uri, "faults")
    assert run.info.status in ("RUNNING", "FAILED")  # killed: left running, or ended by a dying worker
    finish("pretrain.py", args, log)  # the resubmit
    client, run = the_run(uri, "faults")
    assert run.info.status == "FINISHED" and 2 <= int(run.data.tags["uta.resumed_from_step"]) < 8
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == set(range(1, 9))  # every step logged, in one run
    final = final_state(work / "runs", "faults", 8)
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {8}  # AdamW never restarted


# --------------------------------------------------------------------- caching
SHARDS, PER_SHARD, VIEWS = 8, 48, 2


@pytest.mark.timeout(500)
def test_a_killed_caching_job_reruns_to_every_key_and_view_once(tmp_path):
    # The compact codec: its basis is fitted by the first run and must be reused by the rerun.
    args = [*cache_overrides(tmp_path, shards=SHARDS, per_shard=PER_SHARD), "ray.batch_size=16",
            "ray.images_per_block=8", "ray.progress_bars=false", f"num_views={VIEWS}",
            "output.token_codec=lowrank_int8", "output.token_rank=8", "output.basis_views=64",
            "output.part_mb=0.05", "output.manifest_interval_s=0"]  # small parts, each commit saved
    manifest = tmp_path / "cache" / MANIFEST_NAME

    def committed() -> int:
        try:
            return len(json.loads(manifest.read_text())["shards"])
        except (FileNotFoundError, ValueError):
            return 0

    log = tmp_path / "job.log"
    proc = start("cache_teacher.py", args, log)
    wait_for(lambda: committed() >= 3, proc, log, timeout=300, what="3 committed shards")
    kill_driver(proc)
    at_kill = committed()
    assert 3 <= at_kill < SHARDS, f"the kill came after {at_kill} of {SHARDS} shards: not mid-job"
    basis = json.loads(manifest.read_text())["token_basis"]
    finish("cache_teacher.py", args, log)  # the rerun skips the committed shards, redoes the rest
    final = json.loads(manifest.read_text())
    assert final["token_basis"] == basis  # the rows of both runs decode with the same basis
    listed = [p["file"] for rec in final["shards"].values() for p in rec["parts"]]
    on_disk = sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache" / "shards").rglob("*.parquet"))
    assert sorted(listed) == on_disk  # every part the killed run left half-done is gone
    keys = [(k, v) for part in listed
            for k, v in zip(*pq.read_table(tmp_path / "cache" / part, columns=["key", "view"]).to_pydict().values())]
    counts = collections.Counter(keys)
    expected = {(s.key, v) for s in digits_samples(SHARDS * PER_SHARD, size=32) for v in range(VIEWS)}
    duplicates = [kv for kv, n in counts.items() if n > 1]
    missing = expected - set(counts)
    assert (len(duplicates), len(missing), len(counts)) == (0, 0, len(expected))
    assert sorted(json.loads(manifest.read_text())["shards"]) == [f"{i:05d}" for i in range(SHARDS)]
    assert not list((tmp_path / "cache").glob(".manifest.json.*.tmp"))

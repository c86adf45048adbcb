"""A fault trial on a real Ray, as a cluster meets it: a caching job's driver SIGKILLed after some
shards; the rerun ends in a cache with every (key, view) row once (0 duplicates, 0 missing).
(A SIGKILLed training driver: tests/test_cluster_configs.py, on the local cluster the README
starts; a SIGKILLed training worker: tests/test_pretrain.py, with its cache and checkpoints on S3.)

The driver runs as a separate process (``python pipelines/cache_teacher.py``) that joins the
session's Ray, as a submitted job joins its cluster, so a kill hits a real driver and the
cluster lives on; inputs are the ``--smoke-test`` ones (tiny, generated).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.lib.smoke import cache_overrides
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
    """SIGKILL the driver and whatever it started; Ray ends the tasks and actors it owned."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
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


# --------------------------------------------------------------------- caching
SHARDS, PER_SHARD, VIEWS = 8, 48, 2


@pytest.mark.timeout(500)
def test_a_killed_caching_job_reruns_to_every_key_and_view_once(ray_local, tmp_path):
    # The compact codec: its basis is fitted by the first run and must be reused by the rerun.
    joined = f"ray.address={ray_local.get_runtime_context().gcs_address}"  # the session's Ray
    args = [*cache_overrides(tmp_path, shards=SHARDS, per_shard=PER_SHARD), joined, "ray.batch_size=16",
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

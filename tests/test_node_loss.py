"""A second node and a lost node, on two real Ray nodes of this machine (cluster/local/start.sh + add_node.sh).

The streamed teacher's pool asks for a ``teacher`` resource that only the worker node offers: every teacher
actor runs there and the trainer on the head (read from Ray's state API). Mid-run the worker node is killed
as a lost machine is (SIGKILL of its raylet, workers and agents: remove_node.sh --kill); the run says what it
waits for, a replacement node joins, the pool refills on it, and every epoch's rows are exactly those of the
same run uninterrupted and without Ray (the teacher inline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import pretrain_config, pretrain_overrides, samples_seen, train_ranks

from pipelines.lib.ray_setup import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "cluster" / "local"
pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCH_STEPS = 15  # 120 train digits / 8 a step
RUN = ["train.max_steps=45", "run.checkpoint_every=3", "cluster.cpus_per_worker=1", "cluster.read_cpus=0.5",
       "cluster.read_tasks=1", "stream.codec=float16", "stream.pool.blocks_in_flight=1",
       "stream.pool.resources={teacher: 1}", "stream.pool.cpus_per_actor=1", "eval.input=null",
       "eval.retrieval_input=null"]


STATE_SCRIPT = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = {n.node_id: "head" if n.is_head_node else n.node_name for n in list_nodes(address=address)}
actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
print(json.dumps([{"class": a.class_name, "node": nodes.get(a.node_id, "?")} for a in actors]))
"""


class LocalCluster:
    """cluster/local/start.sh's head with free ports and a token of its own, and its scripts' nodes."""

    def __init__(self, workdir: Path) -> None:
        token = workdir / "token"
        token.write_text("uta-test-" + os.urandom(16).hex())
        self.port, self.dash = free_port(), free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "token",
            "UTA_RAY_STATE_DIR": str(workdir / "state"), "UTA_RAY_PORT": str(self.port),
            "UTA_RAY_DASHBOARD_PORT": str(self.dash), "UTA_RAY_CLIENT_PORT": str(free_port()),
            "UTA_RAY_NUM_CPUS": "3",  # the trainer 1, a read task 0.5: the teacher has no room on the head
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.nodes: list[str] = []

    def script(self, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(LOCAL / name), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{name} {args}: {done.stdout}{done.stderr}"
        return done

    def add_node(self, name: str) -> float:
        start = time.monotonic()
        self.script("add_node.sh", name, "--cpus", "1", "--resources", '{"teacher": 1}')
        self.nodes.append(name)
        return time.monotonic() - start

    def actors(self) -> list[dict]:
        """Every live actor with its class and its node's name ("head" for the head), from Ray's state API."""
        done = subprocess.run([sys.executable, "-c", STATE_SCRIPT, f"127.0.0.1:{self.port}"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("two-nodes"))
    local.script("start.sh")
    try:
        yield local
    finally:
        for node in local.nodes:
            subprocess.run(["bash", str(LOCAL / "remove_node.sh"), node, "--kill"], env=local.env,
                           capture_output=True, timeout=60)
        subprocess.run(["bash", str(LOCAL / "stop.sh")], env=local.env, capture_output=True, timeout=120)


@pytest.mark.timeout(900)
def test_the_teacher_node_killed_mid_epoch_and_replaced_loses_and_repeats_no_row(cluster, pretrain_ws, tmp_path):
    ws = pretrain_ws
    cluster.add_node("teacher1")
    storage = tmp_path / "runs"
    args = [*pretrain_overrides(ws, "nodes", "stream", str(storage)), f"cluster.address=127.0.0.1:{cluster.port}",
            *RUN]
    log = tmp_path / "job.log"
    with log.open("w") as out:
        job = subprocess.Popen([sys.executable, "pipelines/pretrain.py", "--config", "configs/pretrain_local.yaml",
                                *args], cwd=ROOT, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
        watch = NodeKiller(cluster, storage / "nodes" / "samples", log, job)
        try:
            code = job.wait(timeout=420)
        except subprocess.TimeoutExpired:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            dump = subprocess.run([spy, "dump", "--pid", str(job.pid)], capture_output=True, text=True, timeout=60)
            pytest.fail(f"the run hung ({watch.state()}); its driver:\n{dump.stdout[-5000:]}\nits console:\n"
                        f"{log.read_text()[-3000:]}")
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert watch.error is None, f"{watch.error}; the console:\n{text[-3000:]}"
    assert code == 0, text[-4000:]
    # Placement, seen while the run trained: the teacher's actors on the teacher node only, the trainer on the head.
    assert {a["node"] for a in watch.placement if a["class"] == "StageActor"} == {"teacher1"}, watch.placement
    assert {a["node"] for a in watch.placement if a["class"] == "RayTrainWorker"} == {"head"}, watch.placement
    # The console's board on the driver's node: on the teacher node, it went with it and the console fell silent.
    assert {a["node"] for a in watch.placement if a["class"] == "ProgressBoard"} == {"head"}, watch.placement
    assert watch.killed_at_epoch == 0, "the node was not killed mid-epoch"
    assert "0 of 1 actors of the teacher pool: waiting for nodes with {1 CPU + 1 teacher}" in text, text[-3000:]
    # Every epoch's rows are those of the same run without Ray and without a fault, in the same order.
    reference = pretrain_config(ws, "reference", "stream", *RUN[:2], "stream.codec=float16", "eval.input=null",
                                "eval.retrieval_input=null", storage=str(tmp_path / "reference"))
    assert train_ranks(reference, 1, tmp_path) == [0]
    for epoch in range(3):
        got = samples_seen(str(storage), "nodes", 0, epoch)
        assert got == samples_seen(str(tmp_path / "reference"), "reference", 0, epoch), f"epoch {epoch}"
        assert len(got) == len(set(got)) == 120
    print(f"\nnode loss (stream): lost 0, repeated 0; killed in epoch 0, the run said so in {watch.said_s:.0f} s, "
          f"the replacement joined in {watch.join_s:.0f} s")


class NodeKiller:
    """From a thread: read the actors' placement while the workers start; once the run records its first rows
    (step 3 of epoch 0's 15), kill the teacher node; wait for the run's waiting line, then add a replacement."""

    def __init__(self, cluster: LocalCluster, samples: Path, log: Path, job: subprocess.Popen) -> None:
        self.cluster, self.samples, self.log, self.job = cluster, samples, log, job
        self.placement: list[dict] = []
        self.killed_at_epoch: int | None = None
        self.said_s = self.join_s = float("nan")
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not {"StageActor", "RayTrainWorker"} <= {a["class"] for a in self.placement}:
                if self.job.poll() is not None or time.monotonic() > deadline:
                    return
                self.placement = self.cluster.actors()  # while the workers start
                time.sleep(0.5)
            while not list(self.samples.glob("rank0-epoch0000-*")):  # the first record: step 3 of 15
                if self.job.poll() is not None or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            self.cluster.script("remove_node.sh", "teacher1", "--kill")
            self.cluster.nodes.remove("teacher1")
            self.killed_at_epoch = 0
            killed = time.monotonic()
            while "waiting for nodes with" not in self.log.read_text():
                if self.job.poll() is not None:
                    return
                if time.monotonic() > killed + 150:
                    self.error = "the console said nothing of the lost node in 150 s"
                    self.job.kill()  # the run would wait for a node no one adds: fail now, with its console
                    return
                time.sleep(0.5)
            self.said_s = time.monotonic() - killed
            self.join_s = self.cluster.add_node("teacher2")
        except Exception as err:  # the test reports it
            self.error = f"{type(err).__name__}: {err}"

    def state(self) -> str:
        return (f"killed in epoch {self.killed_at_epoch}, said after {self.said_s:.0f} s, replacement joined in "
                f"{self.join_s:.0f} s, error: {self.error}")

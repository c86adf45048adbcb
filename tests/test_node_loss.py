"""A second node and a lost node, on real Ray nodes of this machine (cluster/local/start.sh + add_node.sh).

Each trial gives one job's actors a custom resource that only a worker node offers, checks from Ray's
state API that they run there (and the rest on the head), kills that node mid-job as a lost machine is
(SIGKILL of its raylet, workers and agents: remove_node.sh --kill), adds a replacement node, and proves
every row once:

- stream (every CI): the streamed teacher's node. The run says what it waits for, the pool refills on the
  replacement, the trainers keep their state, and every epoch's rows are those of the same run
  uninterrupted and without Ray.
- pool (``UTA_LONG_TESTS=1``): the streamed teacher's pool across two teacher nodes: it grows onto a node
  that joins (``max_actors``) and shrinks off one that is lost, with no wait and every row once.
- train (``UTA_LONG_TESTS=1``): the node of the Ray Train worker. Ray Train restarts the group from the
  newest checkpoint on the replacement; the rows are those of the uninterrupted run.
- cache (``UTA_LONG_TESTS=1``): the node of the caching job's teacher actors. Ray Data restarts them on the
  replacement and sends their batches again; the cache holds every (key, view) once and no stray part.

With ``UTA_NODE_LOSS_REPORT=FILE`` each trial appends its figures to FILE (``./uta bench node_loss``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import pretrain_config, pretrain_overrides, samples_seen, train_ranks

from pipelines.lib.ray_setup import free_port
from pipelines.lib.smoke import cache_overrides
from uta_core.cache.format import MANIFEST_NAME
from uta_core.data.digits import digits_samples

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "cluster" / "local"
pytestmark = [pytest.mark.ray, pytest.mark.slow]
LONG = pytest.mark.skipif(not os.environ.get("UTA_LONG_TESTS"), reason="set UTA_LONG_TESTS=1 to run it")

EPOCH_STEPS = 15  # 120 train digits / 8 a step
RUN = ["train.max_steps=45", "run.checkpoint_every=3", "cluster.cpus_per_worker=1", "cluster.read_cpus=0.5",
       "cluster.read_tasks=1", "eval.input=null", "eval.retrieval_input=null"]
STREAM = ["stream.codec=float16", "stream.pool.blocks_in_flight=1", "stream.pool.resources={teacher: 1}",
          "stream.pool.cpus_per_actor=1"]
TEACHER, TRAINER = {"teacher": 1}, {"trainer": 1}


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
            "UTA_RAY_NUM_CPUS": "3",  # a trainer 1, a read task 0.5: no custom resources, the jobs' actors go elsewhere
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.nodes: list[str] = []

    def script(self, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(LOCAL / name), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{name} {args}: {done.stdout}{done.stderr}"
        return done

    def add_node(self, name: str, resources: dict[str, float]) -> float:
        start = time.monotonic()
        self.script("add_node.sh", name, "--cpus", "1", "--resources", json.dumps(resources))
        self.nodes.append(name)
        return time.monotonic() - start

    def kill_node(self, name: str) -> None:
        self.script("remove_node.sh", name, "--kill")
        self.nodes.remove(name)

    def actors(self) -> list[dict]:
        """Every live actor with its class and its node's name ("head" for the head), from Ray's state API."""
        done = subprocess.run([sys.executable, "-c", STATE_SCRIPT, f"127.0.0.1:{self.port}"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def job(self, script: str, config: str, args: list[str], log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            return subprocess.Popen([sys.executable, f"pipelines/{script}", "--config", config, *args,
                                     f"{'ray' if script == 'cache_teacher.py' else 'cluster'}.address="
                                     f"127.0.0.1:{self.port}"], cwd=ROOT, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("two-nodes"))
    local.script("start.sh")
    try:
        yield local
    finally:
        subprocess.run(["bash", str(LOCAL / "stop.sh")], env=local.env, capture_output=True, timeout=120)


@pytest.fixture
def cluster(head):
    """The head, and after the test none of the nodes it added (their resources would draw the next job's actors)."""
    try:
        yield head
    finally:
        for node in list(head.nodes):
            subprocess.run(["bash", str(LOCAL / "remove_node.sh"), node, "--kill"], env=head.env,
                           capture_output=True, timeout=60)
            head.nodes.remove(node)


class NodeKiller:
    """From a thread: read the actors' placement while the job starts (until ``placed`` classes run); once
    ``due()``, kill ``victim``; wait for the job's console to say ``said`` (if any), add the replacement, and
    time until the console says ``back`` (if any)."""

    def __init__(self, cluster: LocalCluster, job: subprocess.Popen, log: Path, *, victim: str, placed: set[str],
                 due: Callable[[], bool], replacement: tuple[str, dict], said: str | None = None,
                 back: str | None = None) -> None:
        self.cluster, self.job, self.log, self.victim, self.placed = cluster, job, log, victim, placed
        self.due, self.replacement, self.said, self.back = due, replacement, said, back
        self.placement: list[dict] = []
        self.killed = False
        self.said_s = self.join_s = self.back_s = float("nan")
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def on(self, cls: str) -> set[str]:
        """The nodes ``cls``'s actors ran on (``cls`` in the class's name: Ray Data's is ``..MapWorker..``)."""
        return {a["node"] for a in self.placement if cls in a["class"]}

    def _wait(self, condition: Callable[[], bool], limit: float, what: str) -> bool:
        deadline = time.monotonic() + limit
        while not condition():
            if self.job.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.error = f"no {what} within {limit:.0f} s"
                self.job.kill()  # the job would wait for what never comes: fail now, with its console
                return False
            time.sleep(0.1)
        return True

    def _placed(self) -> bool:
        self.placement = self.cluster.actors()
        return all(any(cls in a["class"] for a in self.placement) for cls in self.placed)

    def _run(self) -> None:
        try:
            if not (self._wait(self._placed, 300, f"actors {sorted(self.placed)}") and
                    self._wait(self.due, 300, "moment to kill the node")):
                return
            self.cluster.kill_node(self.victim)
            self.killed, killed = True, time.monotonic()
            if self.said is not None:
                if not self._wait(lambda: self.said in self.log.read_text(), 150, f"console line {self.said!r}"):
                    return
                self.said_s = time.monotonic() - killed
            self.join_s = self.cluster.add_node(*self.replacement)
            joined = time.monotonic()
            if self.back is not None:
                seen = self.log.read_text().count(self.back)
                if self._wait(lambda: self.log.read_text().count(self.back) > seen, 300, f"{self.back!r} after"):
                    self.back_s = time.monotonic() - joined
        except Exception as err:  # the test reports it
            self.error = f"{type(err).__name__}: {err}"

    def state(self) -> str:
        return (f"killed: {self.killed}, said after {self.said_s:.0f} s, replacement joined in {self.join_s:.0f} s, "
                f"back {self.back_s:.0f} s after it, error: {self.error}")


class JoinThenLose(NodeKiller):
    """Once ``due()``, add ``replacement`` and time until the console says ``back`` (the pool grew onto it);
    then kill ``victim`` and time until it says ``said`` (the pool shrank onto the node that joined)."""

    def _run(self) -> None:
        try:
            if not (self._wait(self._placed, 300, f"actors {sorted(self.placed)}") and
                    self._wait(self.due, 300, "moment to add the node")):
                return
            self.join_s = self.cluster.add_node(*self.replacement)
            joined = time.monotonic()
            if not self._wait(lambda: self.back in self.log.read_text(), 300, f"console line {self.back!r}"):
                return
            self.back_s = time.monotonic() - joined
            self.placement = self.cluster.actors()  # the pool on both nodes
            self.cluster.kill_node(self.victim)
            self.killed, killed = True, time.monotonic()
            if self._wait(lambda: self.said in self.log.read_text(), 150, f"console line {self.said!r}"):
                self.said_s = time.monotonic() - killed
        except Exception as err:  # the test reports it
            self.error = f"{type(err).__name__}: {err}"


def finish(job: subprocess.Popen, watch: NodeKiller, log: Path, timeout: float = 420) -> str:
    """The job's console once it ended with 0 and its node killer without an error."""
    try:
        code = job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        dump = subprocess.run([spy, "dump", "--pid", str(job.pid)], capture_output=True, text=True, timeout=60)
        pytest.fail(f"the job hung ({watch.state()}); its driver:\n{dump.stdout[-5000:]}\nits console:\n"
                    f"{log.read_text()[-3000:]}")
    finally:
        if job.poll() is None:
            job.kill()
    watch.thread.join(timeout=30)
    text = log.read_text()
    assert watch.error is None, f"{watch.error}; the console:\n{text[-3000:]}"
    assert code == 0, text[-4000:]
    assert watch.killed, "the node was not killed mid-job"
    return text


def report(trial: str, lost: int, repeated: int, watch: NodeKiller, redone: str, seconds: float) -> None:
    row = {"trial": trial, "lost": lost, "repeated": repeated, "detect_s": round(watch.said_s, 1),
           "join_s": round(watch.join_s, 1), "refill_s": round(watch.back_s, 1), "redone": redone,
           "seconds": round(seconds)}
    print(f"\nnode loss ({trial}): {row}")
    if os.environ.get("UTA_NODE_LOSS_REPORT"):
        with open(os.environ["UTA_NODE_LOSS_REPORT"], "a") as out:
            out.write(json.dumps(row) + "\n")


def rows_against_reference(ws, storage: Path, name: str, mode: str, tmp_path: Path, *extra: str,
                           steps: int = 45) -> tuple[int, int]:
    """(rows lost, rows repeated) over the run's epochs against the same run without Ray and without a fault;
    asserts every epoch's rows are the reference's, in its order."""
    reference = pretrain_config(ws, "reference", mode, f"train.max_steps={steps}", *RUN[1:2], *extra,
                                "eval.input=null", "eval.retrieval_input=null", storage=str(tmp_path / "reference"))
    assert train_ranks(reference, 1, tmp_path) == [0]
    lost = repeated = 0
    for epoch in range(steps // EPOCH_STEPS):
        got = samples_seen(str(storage), name, 0, epoch)
        want = samples_seen(str(tmp_path / "reference"), "reference", 0, epoch)
        lost += len(set(want) - set(got))
        repeated += len(got) - len(set(got))
        assert got == want, f"epoch {epoch}: {len(got)} rows, {len(set(got))} distinct, {len(want)} wanted"
    return lost, repeated


def steps_redone(ws, storage: Path, name: str) -> int:
    """Steps the run trained twice: loss values MLflow holds beyond one a step."""
    from uta_core.tracking import metric_history

    run_id = json.loads((storage / name / "mlflow_run.json").read_text())["run_id"]
    steps = [p["step"] for p in metric_history(ws.mlflow, run_id, "loss")]
    return len(steps) - len(set(steps))


def first_record(storage: Path, name: str) -> Callable[[], bool]:
    return lambda: bool(list((storage / name / "samples").glob("rank0-epoch0000-*")))  # step 3 of epoch 0's 15


def checkpoint_after(storage: Path, name: str, step: int) -> Callable[[], bool]:
    """Once the run wrote checkpoint ``step``: the one before it is committed, a restart has one to resume."""
    return lambda: (storage / name / f"checkpoint_{step:07d}").exists()


@pytest.mark.timeout(900)
def test_the_teacher_node_killed_mid_epoch_and_replaced_loses_and_repeats_no_row(cluster, pretrain_ws, tmp_path):
    ws, storage, log, start = pretrain_ws, tmp_path / "runs", tmp_path / "job.log", time.monotonic()
    cluster.add_node("teacher1", TEACHER)
    job = cluster.job("pretrain.py", "configs/pretrain_local.yaml",
                      [*pretrain_overrides(ws, "nodes", "stream", str(storage)), *RUN, *STREAM], log)
    watch = NodeKiller(cluster, job, log, victim="teacher1", placed={"StageActor", "RayTrainWorker", "ProgressBoard"},
                       due=first_record(storage, "nodes"), replacement=("teacher2", TEACHER),
                       said="waiting for nodes with", back="actors back after")
    text = finish(job, watch, log)
    # Placement, seen while the run trained: the teacher's actors on the teacher node only, the trainer on the
    # head, and the console's board on the driver's node (on the teacher node it went with it: a silent console).
    assert (watch.on("StageActor"), watch.on("RayTrainWorker"), watch.on("ProgressBoard")) == \
        ({"teacher1"}, {"head"}, {"head"}), watch.placement
    assert "0 of 1 actors of the teacher pool: waiting for nodes with {1 CPU + 1 teacher}" in text, text[-3000:]
    lost, repeated = rows_against_reference(ws, storage, "nodes", "stream", tmp_path, "stream.codec=float16")
    redone = steps_redone(ws, storage, "nodes")
    assert redone == 0, "the trainers kept their state: no step is trained twice"
    report("stream", lost, repeated, watch, f"{redone} steps", time.monotonic() - start)


POOL_STEPS = 150  # ~50 s of training on 2 cores: a node's join (~7 s), its actor's start, a loss seen (~15 s)


@LONG
@pytest.mark.timeout(900)
def test_the_pool_grows_onto_a_node_that_joins_and_shrinks_off_one_lost_with_every_row_once(cluster, pretrain_ws,
                                                                                           tmp_path):
    ws, storage, log, start = pretrain_ws, tmp_path / "runs", tmp_path / "job.log", time.monotonic()
    cluster.add_node("teacher1", TEACHER)
    job = cluster.job("pretrain.py", "configs/pretrain_local.yaml",
                      [*pretrain_overrides(ws, "pool", "stream", str(storage)), *RUN, *STREAM,
                       "stream.pool.max_actors=2", f"train.max_steps={POOL_STEPS}"], log)
    watch = JoinThenLose(cluster, job, log, victim="teacher1", placed={"StageActor", "RayTrainWorker"},
                         due=first_record(storage, "pool"), replacement=("teacher2", TEACHER),
                         back="2 of 2 actors running, were 1 (nodes joined)",
                         said="1 of 2 actors running, were 2 (nodes lost: their blocks go to the others)")
    text = finish(job, watch, log)
    assert sorted(a["node"] for a in watch.placement if "StageActor" in a["class"]) == ["teacher1", "teacher2"]
    assert "waiting for nodes with" not in text, "an actor ran all along: the rank never waited for a node"
    lost, repeated = rows_against_reference(ws, storage, "pool", "stream", tmp_path, "stream.codec=float16",
                                            steps=POOL_STEPS)
    redone = steps_redone(ws, storage, "pool")
    assert redone == 0, "the trainers kept their state: no step is trained twice"
    report("pool", lost, repeated, watch, f"{redone} steps", time.monotonic() - start)


@LONG
@pytest.mark.timeout(900)
def test_the_trainers_node_killed_mid_epoch_restarts_from_its_checkpoint_on_the_same_rows(cluster, pretrain_ws,
                                                                                          tmp_path):
    ws, storage, log, start = pretrain_ws, tmp_path / "runs", tmp_path / "job.log", time.monotonic()
    cluster.add_node("trainer1", TRAINER)
    job = cluster.job("pretrain.py", "configs/pretrain_local.yaml",
                      [*pretrain_overrides(ws, "trainer", "cache", str(storage)), *RUN,
                       "cluster.worker_resources={trainer: 1}", "run.max_failures=1"], log)
    watch = NodeKiller(cluster, job, log, victim="trainer1", placed={"RayTrainWorker"},
                       due=checkpoint_after(storage, "trainer", 6), replacement=("trainer2", TRAINER),
                       back="resumed from the checkpoint of step")
    text = finish(job, watch, log)
    assert watch.on("RayTrainWorker") == {"trainer1"}, watch.placement
    assert "resumed from the checkpoint of step" in text, text[-3000:]
    lost, repeated = rows_against_reference(ws, storage, "trainer", "cache", tmp_path)
    redone = steps_redone(ws, storage, "trainer")
    assert 0 <= redone < 3 + 1, "at most the steps since the last checkpoint (every 3) are trained again"
    report("train", lost, repeated, watch, f"{redone} steps", time.monotonic() - start)


SHARDS, PER_SHARD, VIEWS = 12, 48, 2


@LONG
@pytest.mark.timeout(900)
def test_the_cache_jobs_teacher_node_killed_mid_job_gives_every_key_and_view_once(cluster, tmp_path):
    log, start, cache = tmp_path / "job.log", time.monotonic(), tmp_path / "cache"
    cluster.add_node("teacher1", TEACHER)
    manifest = cache / MANIFEST_NAME

    def committed() -> int:
        try:
            return len(json.loads(manifest.read_text())["shards"])
        except (FileNotFoundError, ValueError):
            return 0

    args = [*cache_overrides(tmp_path, shards=SHARDS, per_shard=PER_SHARD), "ray.batch_size=16",
            "ray.images_per_block=8", "ray.progress_bars=false", f"num_views={VIEWS}", "ray.actor_num_cpus=1",
            "ray.actor_resources={teacher: 1}", "output.part_mb=0.05", "output.manifest_interval_s=0"]
    job = cluster.job("cache_teacher.py", "configs/cache_teacher_local.yaml", args, log)
    watch = NodeKiller(cluster, job, log, victim="teacher1", placed={"MapWorker"}, due=lambda: committed() >= 1,
                       replacement=("teacher2", TEACHER), back="committed ")
    finish(job, watch, log)
    assert watch.on("MapWorker") == {"teacher1"}, watch.placement
    final = json.loads(manifest.read_text())
    listed = [p["file"] for rec in final["shards"].values() for p in rec["parts"]]
    on_disk = sorted(str(p.relative_to(cache)) for p in (cache / "shards").rglob("*.parquet"))
    assert sorted(listed) == on_disk, "a part no committed shard lists is left"
    counts = collections.Counter(
        (k, v) for part in listed for k, v in zip(*pq.read_table(cache / part, columns=["key", "view"]).to_pydict()
                                                  .values()))
    expected = {(s.key, v) for s in digits_samples(SHARDS * PER_SHARD, size=32) for v in range(VIEWS)}
    lost, repeated = len(expected - set(counts)), sum(n - 1 for n in counts.values())
    report("cache", lost, repeated, watch, "-", time.monotonic() - start)
    assert (lost, repeated, len(counts)) == (0, 0, len(expected))
    assert sorted(final["shards"]) == [f"{i:05d}" for i in range(SHARDS)]

"""The streamed teacher (``data.teacher_mode=stream``): its tokens against online mode's (the
teacher in the worker, the reference), per codec; the setup a run keeps; losses and exact resume
of the same loop; and its actor pool on a real Ray: the resource it asks for, a SIGKILLed actor,
the blocks a rank has in flight, a pool that cannot start. (Through Ray Train end to end, with a
SIGKILLed worker and a SIGKILLed teacher actor: tests/test_pretrain.py.)"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faults import Fault, faulty_plans
from helpers import (
    checkpoint_state,
    planned,
    pretrain_config,
    pretrain_in_process,
    pretrain_run,
    samples_seen,
    train_ranks,
    upload_tree,
)

from pipelines.lib.pretrain import job as pretrain_job
from pipelines.lib.pretrain.job import run
from pipelines.lib.train.config import PoolConfig
from pipelines.lib.train.spec import Stage
from pipelines.lib.train.stage_pool import PoolMeter, PoolWatch
from uta_core.data.rows import sample_id
from uta_core.data.shards import InputConfig, discover, iter_samples
from uta_core.data.storage import S3Options
from uta_core.run.folder import STREAM_BASIS_FILE as BASIS_FILE
from uta_core.run.folder import STREAM_SETUP_FILE as SETUP_FILE

CPU = torch.device("cpu")
# Through Ray Train with both SIGKILLs this takes ~4.5 min on 2 cores (process starts: the setup
# task, the actor and its restart, two worker groups, a gloo reference); the suite's budget runs
# the same mechanics apart (the loop in-process above, the pool on Ray), this one on request.
LONG = pytest.mark.skipif(not os.environ.get("UTA_LONG_TESTS"), reason="set UTA_LONG_TESTS=1 to run it")


@pytest.fixture(scope="module")
def ws(pretrain_ws):
    return pretrain_ws


def stream_config(ws, name: str, codec: str = "lowrank_int8", *extra: str):
    return pretrain_config(ws, name, "stream", f"stream.codec={codec}", "stream.token_rank=16",
                           "stream.basis_views=64", *extra)


def first_batch(job, plan) -> dict[str, np.ndarray]:
    return next(job.reader(0)(plan.sources.items[0], 0, 0))


def as_batch(block: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in block.items()}


def cosines(a_BTD: torch.Tensor, b_BTD: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a_BTD, b_BTD, dim=-1)


# --------------------------------------------------------------------- tokens
@pytest.mark.parametrize("codec", ["float16", "int8", "lowrank_int8"])
def test_stream_tokens_equal_online_tokens_within_the_codec(ws, codec):
    job, plan = planned(stream_config(ws, f"tokens-{codec}", codec))
    online, _ = planned(pretrain_config(ws, f"tokens-online-{codec}", "online"))
    block = first_batch(job, plan)
    stage = job.stage(on_pool=False).work.open()
    encoded = {**block, **stage(block)}
    assert encoded["tokens"].dtype == np.uint8 and encoded["tokens"].shape[1] == stage.codec.bytes_per_view
    images, tokens = job.source.open(job.cfg.student, CPU)(as_batch(encoded), CPU)
    ref_images, ref_tokens = online.source.open(online.cfg.student, CPU)(as_batch(block), CPU)
    assert torch.equal(images, ref_images)  # same views, same normalisation
    cls, patches = cosines(tokens, ref_tokens)[:, 0], cosines(tokens, ref_tokens)[:, 1:]
    if codec == "float16":
        assert torch.allclose(tokens, ref_tokens, rtol=2 ** -10, atol=1e-6)  # fp16 rounding
    elif codec == "int8":
        assert patches.min() > 0.999 and cls.min() > 0.999  # unit directions, int8 coordinates
    else:  # CLS in fp16; patches within the cosine the basis states (fitted on these very views)
        stated = job.teacher["basis"]
        assert stated["views"] == 64 and cls.min() > 0.9999
        assert patches.mean().item() == pytest.approx(stated["patch_cosine_mean"], abs=2e-3)
        assert patches.min().item() >= stated["patch_cosine_min"] - 1e-3


def test_the_setup_is_stored_with_the_run_reused_on_resume_and_refused_when_damaged(ws):
    cfg = stream_config(ws, "setup")
    job, plan = planned(cfg)
    run = ws.root / "runs" / "setup"
    assert (run / SETUP_FILE).is_file() and (run / BASIS_FILE).is_file()
    basis = (run / BASIS_FILE).read_bytes()
    again, _ = planned(stream_config(ws, "setup", "lowrank_int8", "stream.basis_views=8"))
    assert again.source.setup.basis == basis and again.teacher["basis"] == job.teacher["basis"]  # not refitted
    (run / BASIS_FILE).write_bytes(basis[:-8] + bytes(8))
    with pytest.raises(ValueError, match="the stream's token basis is missing or differs"):
        planned(cfg)


# --------------------------------------------------------------------- the loop
def test_stream_losses_follow_online_losses_and_a_resumed_run_trains_the_same_rows(ws, tmp_path):
    """Same seeds: same rows, views and masks; only the codec differs (lowrank_int8, rank 16 of 32)."""
    extra = ("train.max_steps=6", "eval.input=null", "eval.retrieval_input=null", "run.export=false")
    online = pretrain_in_process(pretrain_config(ws, "loss-online", "online", *extra))
    stream = pretrain_in_process(stream_config(ws, "loss-stream", "lowrank_int8", *extra))
    losses = [[h["loss"] for h in r["history"]] for r in (online, stream)]
    assert len(losses[0]) == len(losses[1]) == 6
    assert np.allclose(losses[1], losses[0], rtol=0.02), losses
    waits = [h["stage_wait_s"] for h in stream["history"]]  # the teacher's time, logged per step (a block: ~4 steps)
    assert len(waits) == 6 and sum(waits) > 0
    cfg = stream_config(ws, "loss-resumed", "lowrank_int8", *extra)
    with pytest.raises(RuntimeError, match="injected failure"):
        pretrain_in_process(cfg, Fault(step=3, once=tmp_path / "struck"))
    resumed = pretrain_in_process(cfg)
    runs = str(ws.root / "runs")
    assert samples_seen(runs, "loss-resumed") == samples_seen(runs, "loss-stream")
    assert resumed["metrics"]["loss"] == pytest.approx(stream["metrics"]["loss"], rel=1e-5)


# --------------------------------------------------------------------- the pool on Ray
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_the_pool_takes_its_resource_survives_a_sigkilled_actor_and_bounds_blocks_in_flight(ws, ray_local):
    from pipelines.lib.train.stage_pool import start_pool, stop_pool

    ray = ray_local
    job, plan = planned(stream_config(ws, "pool", "float16"))
    work = job.stage(on_pool=True).work
    reference = work.open()
    blocks = [dict(b) for b in job.reader(0)(plan.sources.items[0], 0, 0)]
    blocks = (blocks * 4)[:10]
    expected = [reference(b)["tokens"] for b in blocks]

    # A pool that names a resource no node offers fails with what it waited for.
    with pytest.raises(RuntimeError, match=r"did not start within 1 s; each asks for 0.5 CPU \+ 1 no-such-gpu-group"):
        start_pool(Stage(work, PoolConfig(cpus_per_actor=0.5, resources={"no-such-gpu-group": 1},
                                          start_timeout_s=1), "teacher pool"))

    cfg = PoolConfig(actors=1, cpus_per_actor=0.5, resources={"uta_test_teacher": 1}, blocks_in_flight=3)
    pool = start_pool(Stage(work, cfg, "teacher pool"))
    try:
        assert ray.available_resources().get("uta_test_teacher", 0) == 1  # one of two held by the actor
        pulled = []

        def refs():
            for i, block in enumerate(blocks):
                pulled.append(i)
                yield ray.put(block)

        got, meter = [], PoolMeter()
        for i, out in enumerate(pool.through(refs(), rank=0, meter=meter)):
            assert len(pulled) - i <= cfg.blocks_in_flight  # never more blocks out than the bound
            if i == 3:
                os.kill(ray.get(pool.actors[0].pid.remote()), signal.SIGKILL)  # mid-stream
            time.sleep(0.05)  # a slow trainer
            got.append(out["tokens"])
        assert len(got) == len(blocks) and all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert meter.blocks == len(blocks) and meter.rows == sum(len(b) for b in got)
        assert ray.get(pool.actors[0].pid.remote()) > 0  # restarted
    finally:
        stop_pool(pool)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("uta_test_teacher", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("uta_test_teacher", 0) == 2  # released


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_the_pool_grows_as_its_resource_appears_and_holds_the_seconds_of_tokens_it_is_given(ws, ray_local):
    """A node with the teacher resource joining, as the scheduler sees it: the resource a placeholder
    actor held is freed. The pool starts with one actor, its second starts then, and the ranks use it.
    With ``buffer_s`` below one block of the trainer's pace, one block is in flight."""
    from pipelines.lib.train.stage_pool import start_pool, stop_pool

    ray = ray_local
    job, plan = planned(stream_config(ws, "pool-grows", "float16"))
    work = job.stage(on_pool=True).work
    blocks = ([ray.put(dict(b)) for b in job.reader(0)(plan.sources.items[0], 0, 0)] * 12)[:12]

    class Holder:  # defined here: Ray ships it by value (a test module is not importable on workers)
        def ready(self) -> bool:
            return True

    placeholder = ray.remote(num_cpus=0, resources={"uta_test_teacher": 1})(Holder).remote()
    ray.get(placeholder.ready.remote())
    cfg = PoolConfig(actors=1, max_actors=2, cpus_per_actor=0.5, resources={"uta_test_teacher": 1},
                     blocks_in_flight=4, buffer_s=0.02)
    pool = start_pool(Stage(work, cfg, "teacher pool"))
    try:
        assert len(pool.actors) == 2 and len(pool.running()) == 1
        ray.kill(placeholder)  # "a node joins"
        deadline = time.monotonic() + 60
        while len(pool.running()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pool.running()) == 2
        pulled, out_at_take = [], []

        def refs():
            for ref in blocks:
                pulled.append(ref)
                yield ref

        watch, meter, start = PoolWatch(pool), PoolMeter(), time.perf_counter()
        assert watch.read(PoolMeter(), 1.0, 1).keys() == {"stage_wait_s", "teacher_ready_blocks"}  # asks
        for i, _ in enumerate(pool.through(refs(), rank=0, meter=meter)):
            out_at_take.append(len(pulled) - i)
            time.sleep(0.1)  # a trainer slower than buffer_s per block
        assert out_at_take[:2] == [cfg.blocks_in_flight] * 2 and set(out_at_take[4:-1]) == {1}, out_at_take
        rows = [s["rows"] for s in ray.get(pool.stats())]
        assert len(rows) == 2 and min(rows) > 0  # both actors took blocks
        # Rank 0's log steps: the pool's rate over the window, and the actors the trainer's pace asks for.
        window, taken = time.perf_counter() - start, meter.read()
        watch.read(PoolMeter(), 1.0, 1)
        time.sleep(0.3)
        metrics = watch.read(taken, window, 1)
        assert metrics["teacher_actors"] == 2 and metrics["teacher_views_per_s"] > 0
        per_actor, demand = metrics["teacher_views_per_s_per_actor"], taken.rows / (window - taken.wait_s)
        assert metrics["trainer_views_per_s"] == pytest.approx(demand)
        assert metrics["teacher_needed_actors"] == math.ceil(demand / per_actor) >= 1
    finally:
        stop_pool(pool)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_an_actor_down_while_another_runs_has_its_blocks_sent_to_that_one_and_is_taken_back(ws, ray_local, tmp_path,
                                                                                            caplog, monkeypatch):
    """One of two actors' nodes lost, as the scheduler sees it: the actor SIGKILLed, and its restart waits (its
    work does not open) as it waits for a node with room. The blocks it held and those after go to the actor
    that runs, every block once and in order; rank 0 says the pool shrank. When the restart completes (a node
    joined), the next epoch uses both again and rank 0 says so."""
    import logging

    from pipelines.lib.train import stage_pool
    from pipelines.lib.train.stage_pool import start_pool, stop_pool

    ray = ray_local
    monkeypatch.setattr(stage_pool._Waiter, "SLICE_S", 0.3)
    caplog.set_level(logging.INFO, logger="uta.train")
    job, plan = planned(stream_config(ws, "pool-shrinks", "float16"))
    work = job.stage(on_pool=True).work
    reference = work.open()
    blocks = ([dict(b) for b in job.reader(0)(plan.sources.items[0], 0, 0)] * 12)[:12]
    expected = [reference(b)["tokens"] for b in blocks]
    lost = tmp_path / "node-lost"

    class OpensOnceANodeJoins:  # defined here: Ray ships it by value (a test module is not importable on workers)
        def __init__(self, inner, marker: str) -> None:
            self.inner, self.marker = inner, marker

        def open(self):
            while os.path.exists(self.marker):  # a restart "waiting for a node"
                time.sleep(0.05)
            return self.inner.open()

    cfg = PoolConfig(actors=2, cpus_per_actor=0.5, resources={"uta_test_teacher": 1}, blocks_in_flight=3)
    pool = start_pool(Stage(OpensOnceANodeJoins(work, str(lost)), cfg, "teacher pool"))
    try:
        victim = ray.get(pool.actors[1].pid.remote())
        got = []
        for i, out in enumerate(pool.through((ray.put(b) for b in blocks), rank=0)):
            if i == 1:  # the victim holds blocks in flight
                lost.touch()
                os.kill(victim, signal.SIGKILL)
            got.append(out["tokens"])
        assert len(got) == len(blocks) and all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert "teacher pool: 1 of 2 actors running, were 2 (nodes lost: their blocks go to the others)" in caplog.text
        lost.unlink()  # "a node joined": the restart completes
        deadline = time.monotonic() + 60
        while len(pool.alive() or []) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        before = [s["rows"] for s in ray.get(pool.stats())]
        again = [out["tokens"] for out in pool.through((ray.put(b) for b in blocks), rank=0)]  # the next epoch
        assert all(np.array_equal(a, b) for a, b in zip(again, expected)) and len(again) == len(blocks)
        assert all(after > b for after, b in zip([s["rows"] for s in ray.get(pool.stats())], before))  # both work
        assert "teacher pool: 2 of 2 actors running, were 1 (nodes joined)" in caplog.text
        assert ray.get(pool.actors[1].pid.remote()) != victim
    finally:
        lost.unlink(missing_ok=True)
        stop_pool(pool)


def test_a_pool_with_no_actor_running_says_what_it_waits_for_and_stops_after_wait_s(ws, ray_local, caplog,
                                                                                     monkeypatch):
    """Its actor's node gone, as the scheduler sees it: the actor waits for a resource no node offers. A rank
    waiting for a block says so (what the actors ask for, for how long), then stops with one line."""
    from pipelines.lib.train import stage_pool
    from pipelines.lib.train.stage_pool import PoolLost, StageActor, StagePool

    ray = ray_local
    job, plan = planned(stream_config(ws, "pool-lost", "float16"))
    work = job.stage(on_pool=True).work
    block = ray.put(dict(next(iter(job.reader(0)(plan.sources.items[0], 0, 0)))))
    actor = StageActor.options(num_cpus=0.5, resources={"uta_lost_node": 1}).remote(work)  # no node offers it
    pool = StagePool([actor], [actor.ready.remote()], 1, name="teacher pool", wants="0.5 CPU + 1 uta_lost_node",
                     wait_s=1.0)
    monkeypatch.setattr(stage_pool._Waiter, "SLICE_S", 0.3)
    start = time.monotonic()
    try:
        with pytest.raises(PoolLost, match=r"teacher pool: no actor ran for \d+ s \(stream.pool.wait_s=1\); their "
                                           r"nodes are gone and none with \{0.5 CPU \+ 1 uta_lost_node\} joined"):
            next(pool.through(iter([block]), rank=0))
    finally:
        ray.kill(actor, no_restart=True)
    assert time.monotonic() - start < 30
    assert "0 of 1 actors of the teacher pool: waiting for nodes with {0.5 CPU + 1 uta_lost_node}, 0 s" in caplog.text


# --------------------------------------------------------------------- end to end on Ray Train
@pytest.mark.ray
@pytest.mark.timeout(600)
@LONG
def test_two_ray_workers_and_a_teacher_pool_on_s3_survive_sigkills_and_train_the_rows_of_the_run_without_ray(
    pretrain_ws, ray_local, s3_server, s3_client, s3_bucket, monkeypatch, tmp_path
):
    """The streamed teacher end to end: input shards, checkpoints, samples and export on S3 (moto),
    two Ray Train workers, the teacher on a pool actor that needs the cluster's teacher resource.
    The actor is SIGKILLed once the ranks have trained (Ray restarts it, its blocks are sent again);
    rank 0's process SIGKILLs itself after step 3 (checkpoint at 2) and FailureConfig(max_failures=1)
    restarts the group from the newest checkpoint. Each rank's rows are then exactly those of the
    same two-rank run, uninterrupted and without Ray (LocalRuntime, gloo, the teacher inline)."""
    ws = pretrain_ws
    upload_tree(s3_client, s3_bucket, "train", ws.train)
    storage, s3 = f"s3://{s3_bucket}/runs", S3Options(endpoint_url=s3_server)
    sigkill = Fault(step=3, kind="sigkill", once=tmp_path / "struck")  # rank 0's process, once
    monkeypatch.setattr(pretrain_job, "plan_pretrain", faulty_plans(pretrain_job.plan_pretrain, sigkill))
    # 2 CPUs: workers 2 x 0.5, the teacher actor 0.5, one read task ahead per rank at 0.25
    stream = ("stream.codec=float16", "cluster.num_workers=2", "train.max_steps=6", "cluster.read_tasks=1",
              "cluster.read_cpus=0.25")
    cfg = pretrain_config(ws, "ray", "stream", *stream, "cluster.cpus_per_worker=0.5", "run.max_failures=1",
                          "stream.pool.cpus_per_actor=0.5", "stream.pool.resources={uta_test_teacher: 1}",
                          f"data.input.paths=s3://{s3_bucket}/train", f"s3.endpoint_url={s3_server}", storage=storage)
    killer = ActorKiller(lambda: s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/ray/samples/")["KeyCount"])
    run(cfg)  # on the session's local Ray
    monkeypatch.undo()
    assert killer.killed, "the teacher actor was never SIGKILLed"
    client, mlrun = pretrain_run(ws.mlflow, "ray")
    history = sorted(client.get_metric_history(mlrun.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 3, 4, 5, 6]  # step 3 again after the restart
    assert mlrun.data.tags["uta.resumed_from_step"] == "2" and mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["uta.teacher_mode"] == "stream" and "stage_wait_s" in mlrun.data.metrics
    final = checkpoint_state(storage, "ray", 6, s3)  # AdamW counts its steps: 6 only if step 2's state came back
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {6}
    killed = [samples_seen(storage, "ray", rank, s3=s3) for rank in (0, 1)]
    assert train_ranks(pretrain_config(ws, "no-ray", "stream", *stream), 2, tmp_path) == [0, 0]
    assert killed == [samples_seen(str(ws.root / "runs"), "no-ray", rank) for rank in (0, 1)]
    train = InputConfig(paths=[str(ws.train)])
    inputs = discover(train, S3Options())
    keys = [s.key for shard in inputs.shards for s in iter_samples(inputs.fs, shard, train)]
    assert len(killed[0]) == len(set(killed[0])) == 48 and not set(killed[0]) & set(killed[1])
    assert set(killed[0]) | set(killed[1]) <= {sample_id(k, 0) for k in keys}  # one fresh view per image


class ActorKiller:
    """SIGKILLs the teacher pool's actor (its process) once ``trained()`` is true, from a thread."""

    def __init__(self, trained) -> None:
        import threading

        self.killed = False
        threading.Thread(target=self._watch, args=(trained,), daemon=True).start()

    def _watch(self, trained) -> None:
        import os
        import signal
        import time

        from ray.util.state import list_actors

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self.killed:
            time.sleep(0.3)
            if not trained():
                continue
            for actor in list_actors(filters=[("class_name", "=", "StageActor"), ("state", "=", "ALIVE")]):
                os.kill(actor.pid, signal.SIGKILL)
                self.killed = True


def _count_to_five(item, start, source):
    for i in range(start, 5):
        yield {"x": [i]}


@pytest.mark.timeout(120)
def test_an_epoch_that_stops_reading_early_closes_its_read_tasks_without_an_error(ray_local):
    """Closing a rank's block stream mid-source must not close Ray's generator (``gen.close is not
    supported``, printed by every worker at every early end) but cancel its tasks."""
    from pipelines.lib.train.ray_runtime import block_refs

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the reader is this test's, not the workers'
    blocks = block_refs(_count_to_five, [(i, 0, i) for i in range(3)], tasks_ahead=2, num_cpus=0.5)
    assert ray_local.get(next(blocks)) == {"x": [0]}
    blocks.close()  # raised NotImplementedError with ``yield from`` over Ray's generator
    assert list(blocks) == []

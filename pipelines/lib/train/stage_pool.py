"""A pool of actors that runs a job's block stage apart from the trainers (the streamed teacher).

A *stage* is work between a rank's reads and its steps that should not run on the trainers'
devices: a frozen teacher on its own GPUs. The job hands the runner a picklable stage (its
``open()`` builds the work once per process and returns ``block -> extra columns``); the driver
starts ``actors`` long-lived actors for the whole run, on the resources the config names, and
every rank sends each block it reads to one of them, in its own order.

Why actors of our own and not a Ray Data ``map_batches`` stage: a Ray Data actor pool lives for
one execution of one dataset. A rank reads a new dataset every epoch (its replayable order), so
the pool, and the teacher's weights, would be rebuilt per rank and epoch, and each rank would need
its own pool. One pool for the run serves every rank and epoch, and the rank's order stays the
order of its blocks, which is what exact resume needs.

- Faults: an actor that dies is restarted by Ray (``max_restarts=-1``), and the blocks it held are
  sent again (``max_task_retries=-1``). A block's columns depend on the block only, so a block
  encoded twice gives the same bytes: no row is lost or trained twice.
- Growth and shrinking: the driver starts ``max_actors`` actors and waits for ``actors`` of them; the
  others wait for nodes with their resources (a pending actor is the autoscaler's demand) and ranks
  take each one on as it starts. An actor whose node is lost waits (RESTARTING) for a node with room;
  while others run, a rank sends the blocks it held to them and no more to it, until it runs again.
- Backpressure: a rank has at most ``blocks_in_flight`` blocks between its reads and its steps, and
  with ``buffer_s`` at most as many as ``buffer_s`` seconds of its training take (its pace, measured);
  a slow trainer stops taking blocks, its read tasks stop at their own bound, and the pool idles.
  The object store holds at most ranks x (blocks in flight + the read tasks' bound) blocks.
- Watching: every rank counts its waits and the blocks it found ready (``PoolMeter``); rank 0 adds
  the pool's views/s and busy time at its log steps (``PoolWatch``, without waiting on the actors)
  and says once how many actors would keep the trainers fed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipelines.lib.progress import CONSOLE
from pipelines.lib.train.config import PoolConfig
from pipelines.lib.train.spec import BlockWork, Stage
from uta_core.errors import RunCannotContinue

log = logging.getLogger("uta.train")


@ray.remote
class StageActor:
    def __init__(self, work: BlockWork) -> None:
        self.work = work.open()
        self.blocks = self.rows = 0
        self.busy_s = 0.0

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def apply(self, block: dict) -> dict:
        start = time.perf_counter()
        out = self.work(block)
        self.busy_s += time.perf_counter() - start
        self.blocks += 1
        self.rows += len(next(iter(block.values()))) if block else 0
        return out

    def stats(self) -> dict[str, float]:
        return {"blocks": self.blocks, "rows": self.rows, "busy_s": self.busy_s}

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class PoolMeter:
    """What a rank's trainer saw of the pool since the last ``read``: seconds it waited for a block,
    blocks and rows it took, and how many blocks were ready ahead of it when it took one."""

    wait_s: float = 0.0
    blocks: int = 0
    rows: int = 0
    ready_ahead: int = 0

    def read(self) -> "PoolMeter":
        out = dataclasses.replace(self)
        self.wait_s, self.blocks, self.rows, self.ready_ahead = 0.0, 0, 0, 0
        return out


class _Pace:
    """Seconds between a rank's takes (a moving average): turns ``buffer_s`` into blocks in flight."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.seconds: float | None = None

    def took(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            gap = now - self.last
            self.seconds = gap if self.seconds is None else 0.8 * self.seconds + 0.2 * gap
        self.last = now


@dataclass
class StagePool:
    """The run's actors (picklable: handles travel to every training worker). ``actors`` holds every
    actor started, also those still waiting for a node; ``started`` their ``ready`` results, so that a
    rank sends blocks only to actors that run, and takes on new ones as nodes join."""

    actors: list[Any]
    started: list[Any]
    blocks_in_flight: int
    buffer_s: float | None = None
    name: str = "stage"
    wants: str = ""  # what each actor asks of a node, for the waiting line
    wait_s: float | None = None  # a rank waits this long for a block while no actor runs, then the run stops

    # This process's view, kept across epochs: the actors seen down while others ran, and how many ran as
    # rank 0 last said.
    lost: set[str] = field(default_factory=set, init=False, repr=False)
    told: int | None = field(default=None, init=False, repr=False)

    def alive(self) -> list[Any] | None:
        """The actors running now, by Ray's state API (a lost node's actors are RESTARTING until a node takes
        them); None when the state API cannot answer (a cluster without its dashboard): then a rank just waits."""
        from ray.util.state import list_actors

        try:
            states = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
        except Exception as err:  # the state API is a view: never a reason to stop training
            log.debug("the state API did not answer: %s", err)
            return None
        ids = {s.actor_id for s in states}
        return [a for a in self.actors if _id(a) in ids]

    def running(self) -> list[Any]:
        """The actors that started (their ``ready`` returned), less those seen down while others ran."""
        if not self.started:
            return list(self.actors)
        done = set(ray.wait(self.started, num_returns=len(self.started), timeout=0)[0])
        up = [a for a, ref in zip(self.actors, self.started) if ref in done]
        return [a for a in up if _id(a) not in self.lost] or up or [self.actors[0]]

    def through(self, block_refs: Iterator[Any], rank: int, meter: PoolMeter | None = None) -> Iterator[dict]:
        """Each block of ``block_refs`` (in order) with the stage's columns added. At most
        ``blocks_in_flight`` blocks are out at once, fewer when ``buffer_s`` seconds of this rank's
        training hold fewer; ``meter`` counts what the trainer waited and found ready."""
        meter = meter if meter is not None else PoolMeter()
        window: collections.deque = collections.deque()
        pace, waiter = _Pace(), _Waiter(self, rank)
        running, looked = waiter.look(), time.monotonic()
        try:
            for i, ref in enumerate(block_refs):
                if waiter.changed or (len(running) < len(self.actors) and time.monotonic() - looked > waiter.SLICE_S):
                    running, looked = waiter.look(), time.monotonic()  # nodes joined or were lost
                actor = running[(rank + i) % len(running)]
                window.append([ref, actor.apply.remote(ref), actor])
                while len(window) >= self._limit(pace):
                    yield _take(window, meter, pace, waiter)
            while window:
                yield _take(window, meter, pace, waiter)
        finally:
            for _, out, _ in window:
                ray.cancel(out)

    def _limit(self, pace: _Pace) -> int:
        if self.buffer_s is None or pace.seconds is None:
            return self.blocks_in_flight
        return max(1, min(self.blocks_in_flight, math.ceil(self.buffer_s / max(pace.seconds, 1e-6))))

    def stats(self) -> list[ray.ObjectRef]:
        return [a.stats.remote() for a in self.running()]


def _id(actor: Any) -> str:
    return actor._actor_id.hex()


def _take(window: collections.deque, meter: PoolMeter, pace: _Pace, waiter: _Waiter) -> dict:
    outs = [out for _, out, _ in window]
    meter.ready_ahead += len(ray.wait(outs, num_returns=len(outs), timeout=0)[0])
    block_ref, out_ref, actor = window.popleft()
    start = time.perf_counter()
    out = waiter.get(block_ref, out_ref, actor)
    meter.wait_s += time.perf_counter() - start
    block = ray.get(block_ref)
    meter.blocks += 1
    meter.rows += len(next(iter(block.values()))) if block else 0
    pace.took()
    return {**block, **out}


class PoolLost(RunCannotContinue):
    """No actor of the pool ran for ``wait_s``: their nodes are gone and none with their resources joined."""


class _Waiter:
    """A rank's wait for its next block. While the block's actor runs, it just waits (the pool is slow, not
    gone). When that actor is down (its node lost; Ray restarts it when a node with room joins) and others
    run, the block goes to one of them and the rank sends no more to it until it runs again. While none
    runs, rank 0 says so once a minute, on the console, and after ``wait_s`` the run stops with one line;
    its last checkpoint stays, and a rerun resumes from it exactly."""

    SLICE_S = 5.0  # how often a waiting rank looks at the pool, and a sending rank for actors that started
    SAY_EVERY_S = 60.0

    def __init__(self, pool: StagePool, rank: int) -> None:
        self.pool, self.rank = pool, rank
        self.changed = False  # an actor was seen down: the sender looks again
        self.moved = 0

    def look(self) -> list[Any]:
        """The actors to send blocks to; rank 0 says when their number changed (nodes joined or were lost)."""
        pool = self.pool
        if pool.lost and (alive := pool.alive()) is not None:
            pool.lost -= {_id(a) for a in alive}
        self.changed = False
        running = pool.running()
        if self.rank == 0 and pool.told is not None and pool.told != len(running):
            why = "nodes joined" if len(running) > pool.told else "nodes lost: their blocks go to the others"
            log.info("%s: %d of %d actors running, were %d (%s)", pool.name, len(running), len(pool.actors),
                     pool.told, why, extra=CONSOLE)
        pool.told = len(running)
        return running

    def get(self, block_ref: Any, ref: Any, actor: Any) -> Any:
        start, said = time.monotonic(), None
        while not ray.wait([ref], timeout=self.SLICE_S)[0]:
            alive = self.pool.alive()
            if alive is None or _id(actor) in {_id(a) for a in alive}:
                continue
            if alive:  # the block's actor is down, others run: one of them encodes it (the same bytes)
                self.pool.lost.add(_id(actor))
                self.changed = True
                _cancel(ref)
                actor, self.moved = alive[self.moved % len(alive)], self.moved + 1
                ref = actor.apply.remote(block_ref)
                continue
            waited = time.monotonic() - start
            if self.rank == 0 and (said is None or waited - said >= self.SAY_EVERY_S):
                log.warning("0 of %d actors of the %s: waiting for nodes with {%s}, %.0f s", len(self.pool.actors),
                            self.pool.name, self.pool.wants, waited, extra=CONSOLE)
                said = waited
            if self.pool.wait_s is not None and waited > self.pool.wait_s:
                raise PoolLost(f"{self.pool.name}: no actor ran for {waited:.0f} s (stream.pool.wait_s="
                               f"{self.pool.wait_s:g}); their nodes are gone and none with {{{self.pool.wants}}} "
                               "joined. Add such nodes and rerun: the run resumes from its last checkpoint")
        if said is not None and self.rank == 0:
            log.info("%s: actors back after %.0f s; training goes on", self.pool.name, time.monotonic() - start,
                     extra=CONSOLE)
        return ray.get(ref)


def _cancel(ref: Any) -> None:
    """Withdraw a block's call to an actor that is down (queued until it restarts); if Ray cannot, the
    restarted actor encodes it once more and nobody reads it."""
    try:
        ray.cancel(ref)
    except Exception as err:
        log.debug("could not cancel a block's call: %s", err)


class PoolWatch:
    """Rank 0's view of the whole pool at its log steps, without waiting on the actors: the stats
    asked for at one log step are read at the next (the first rates come at the second log step).
    Gives the pool's views/s, its actors, how busy they were, and (with the trainers' own pace) how
    many actors would keep the trainers fed."""

    def __init__(self, pool: StagePool) -> None:
        self.pool = pool
        self.asked: tuple[float, list[ray.ObjectRef]] | None = None
        self.last = (time.perf_counter(), 0.0, 0.0)  # (time, rows, busy seconds) summed over actors: the start
        self.advised = False

    def read(self, taken: PoolMeter, window_s: float, world: int) -> dict[str, float]:
        metrics = {"stage_wait_s": taken.wait_s, "teacher_ready_blocks": taken.ready_ahead / max(1, taken.blocks)}
        if self.asked is not None and len(ray.wait(self.asked[1], num_returns=len(self.asked[1]), timeout=0)[0]) \
                == len(self.asked[1]):
            at, stats = self.asked[0], ray.get(self.asked[1])
            now = (at, sum(s["rows"] for s in stats), sum(s["busy_s"] for s in stats))
            if now[0] > self.last[0]:
                metrics.update(_pool_rates(self.last, now, len(stats), taken, window_s, world))
                self._advise(metrics)
            self.last, self.asked = now, None
        if self.asked is None:
            self.asked = (time.perf_counter(), self.pool.stats())
        return metrics

    def _advise(self, m: dict[str, float]) -> None:
        if self.advised or "teacher_needed_actors" not in m:
            return
        self.advised = True
        log.info("teacher pool: %d actor(s) give %.1f views/s (%.1f each, %.0f%% busy); the trainers would take "
                 "%.1f views/s and waited %.0f%% of their time: %d actor(s) keep them fed (stream.pool.actors / "
                 "max_actors; cluster/README.md, \"Sizing the teacher pool\")", m["teacher_actors"],
                 m["teacher_views_per_s"], m["teacher_views_per_s_per_actor"], 100 * m["teacher_busy"],
                 m["trainer_views_per_s"], 100 * m["trainer_wait_frac"], m["teacher_needed_actors"], extra=CONSOLE)


def _pool_rates(last: tuple[float, float, float], now: tuple[float, float, float], actors: int,
                taken: PoolMeter, window_s: float, world: int) -> dict[str, float]:
    seconds, rows, busy = now[0] - last[0], now[1] - last[1], now[2] - last[2]
    out = {"teacher_actors": float(actors), "teacher_views_per_s": rows / seconds,
           "teacher_busy": min(1.0, busy / (seconds * actors))}
    if busy > 0 and rows > 0 and window_s > 0 and taken.rows:
        per_actor = rows / busy
        working = max(window_s - taken.wait_s, 1e-6)  # the trainers' pace had they never waited
        demand = taken.rows / working * world
        out.update(teacher_views_per_s_per_actor=per_actor, trainer_views_per_s=demand,
                   trainer_wait_frac=min(1.0, taken.wait_s / window_s),
                   teacher_needed_actors=float(math.ceil(demand / per_actor)))
    return out


def _options(cfg: PoolConfig) -> dict[str, Any]:
    # "DEFAULT": never inside the placement group of the trainers (a Tune trial's captures child tasks).
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor or None,
            "resources": dict(cfg.resources) or None, "scheduling_strategy": "DEFAULT"}


def _not_started(what: str, cfg: PoolConfig, missing: int) -> RuntimeError:
    return RuntimeError(
        f"{what}: {missing} of the first {cfg.actors} actor(s) did not start within {cfg.start_timeout_s:g} s; "
        f"each asks for {cfg.wants()} and no node offered it. Add nodes that do (a node group with these resources; on "
        "one machine: ray start --resources='{\"NAME\": N}'), or lower the pool's size or resources")


def start_pool(stage: Stage) -> StagePool:
    """Start the stage's actors and wait until ``actors`` of them have built their work; the rest (up to
    ``max_actors``) start as nodes with their resources join (a pending actor is the autoscaler's
    demand for such a node). A pool whose first actors never start fails after ``start_timeout_s``
    with what it waited for and how to provide it."""
    cfg = stage.pool
    actor = StageActor.options(**_options(cfg), max_restarts=-1, max_task_retries=-1)
    actors = [actor.remote(stage.work) for _ in range(cfg.most_actors)]
    started = [a.ready.remote() for a in actors]
    pool = StagePool(actors, started, cfg.blocks_in_flight, cfg.buffer_s, name=stage.name, wants=cfg.wants(),
                     wait_s=cfg.wait_s)
    done, _ = ray.wait(started, num_returns=cfg.actors, timeout=cfg.start_timeout_s)
    if len(done) < cfg.actors:
        stop_pool(pool)
        raise _not_started(stage.name, cfg, cfg.actors - len(done))
    nodes = ray.get(done)
    more = f"; {cfg.most_actors - len(done)} more start as nodes join" if len(done) < cfg.most_actors else ""
    log.info("%s: %d actor(s) ready on %d node(s), each %s%s", stage.name, len(done), len(set(nodes)), cfg.wants(),
             more)
    return pool


def stop_pool(pool: StagePool) -> None:
    for actor in pool.actors:
        ray.kill(actor, no_restart=True)


def call_on_pool_resources(cfg: PoolConfig, what: str):
    """``call(fn, *args)``: ``fn(*args)`` as one Ray task on the resources of one pool actor (a setup
    that needs what the actors have, e.g. the teacher's GPU), failing as ``start_pool`` does."""

    def call(fn, *args):
        ref = ray.remote(fn).options(**_options(cfg), max_retries=2).remote(*args)
        done, _ = ray.wait([ref], timeout=cfg.start_timeout_s)
        if not done:
            ray.cancel(ref, force=True)
            raise _not_started(what, cfg, 1)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the task's own error, not Ray's wrapping of it
            raise (err.cause if isinstance(err.cause, Exception) else err) from None

    return call

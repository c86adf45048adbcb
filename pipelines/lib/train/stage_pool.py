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
- Backpressure: a rank has at most ``blocks_in_flight`` blocks between its reads and its steps;
  a slow trainer stops taking blocks, its read tasks stop at their own bound, and the pool idles.
  The object store holds at most ranks x (``blocks_in_flight`` + the read tasks' bound) blocks.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from pipelines.lib.train.config import PoolConfig
from pipelines.lib.train.spec import BlockWork, Stage

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
class StagePool:
    """The run's actors (picklable: handles travel to every training worker)."""

    actors: list[Any]
    blocks_in_flight: int

    def through(self, block_refs: Iterator[Any], rank: int, waits: list[float] | None = None) -> Iterator[dict]:
        """Each block of ``block_refs`` (in order) with the stage's columns added; ``waits`` collects the
        seconds this rank waited for a stage result (the trainer's wait on the pool)."""
        window: collections.deque = collections.deque()
        try:
            for i, ref in enumerate(block_refs):
                actor = self.actors[(rank + i) % len(self.actors)]
                window.append((ref, actor.apply.remote(ref)))
                if len(window) >= self.blocks_in_flight:
                    yield _joined(*window.popleft(), waits)
            while window:
                yield _joined(*window.popleft(), waits)
        finally:
            for _, out in window:
                ray.cancel(out)

    def stats(self) -> list[dict[str, float]]:
        return ray.get([a.stats.remote() for a in self.actors])


def _joined(block_ref, out_ref, waits: list[float] | None) -> dict:
    start = time.perf_counter()
    out = ray.get(out_ref)
    if waits is not None:
        waits.append(time.perf_counter() - start)
    return {**ray.get(block_ref), **out}


def _options(cfg: PoolConfig) -> dict[str, Any]:
    # "DEFAULT": never inside the placement group of the trainers (a Tune trial's captures child tasks).
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor or None,
            "resources": dict(cfg.resources) or None, "scheduling_strategy": "DEFAULT"}


def _not_started(what: str, cfg: PoolConfig, missing: int) -> RuntimeError:
    return RuntimeError(
        f"{what}: {missing} of {cfg.actors} actor(s) did not start within {cfg.start_timeout_s:g} s; each asks "
        f"for {cfg.wants()} and no node offered it. Add nodes that do (a node group with these resources; on "
        "one machine: ray start --resources='{\"NAME\": N}'), or lower the pool's size or resources")


def start_pool(stage: Stage) -> StagePool:
    """Start the stage's actors and wait until each has built its work; a pool whose resources never
    appear fails after ``start_timeout_s`` with what it waited for and how to provide it."""
    cfg = stage.pool
    actor = StageActor.options(**_options(cfg), max_restarts=-1, max_task_retries=-1)
    actors = [actor.remote(stage.work) for _ in range(cfg.actors)]
    ready = [a.ready.remote() for a in actors]
    done, pending = ray.wait(ready, num_returns=len(ready), timeout=cfg.start_timeout_s)
    if pending:
        stop_pool(StagePool(actors, cfg.blocks_in_flight))
        raise _not_started(stage.name, cfg, len(pending))
    nodes = ray.get(done)
    log.info("%s: %d actor(s) ready on %d node(s), each %s", stage.name, len(actors), len(set(nodes)), cfg.wants())
    return StagePool(actors, cfg.blocks_in_flight)


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

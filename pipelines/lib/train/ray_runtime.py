"""The loop's runtime on a Ray cluster: Ray Train's worker group, and a rank's sources read by Ray tasks.

``train_loop_per_worker`` is what every ``TorchTrainer`` worker runs: it builds ``RayRuntime``
from Ray Train's context and calls the one loop (``loop.train_worker``).

A rank reads its sources with ``block_refs``: one streaming-generator task per source (the
reader's blocks flow to the rank as they are decoded, at most ``blocks_ahead`` unconsumed per
task), ``tasks_ahead`` sources in flight, consumed in the rank's order. That is all a
replayable per-rank stream needs; Ray Data's streaming executor would add its own thread to
every training process and a coordinator per epoch (``benchmarks/pretrain_step.py`` measures
both against the in-process reader). A job with a stage (the streamed teacher) sends each block
through the run's actor pool on the way (``stage_pool.py``).
"""

from __future__ import annotations

import collections
import itertools
import tempfile
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from pipelines.lib.progress import WorkerProgress
from pipelines.lib.train.loop import train_worker
from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.spec import TrainJob
from pipelines.lib.train.stage_pool import PoolMeter, PoolWatch, StagePool
from uta_core.data.stream import ReadTask, SourceReader
from uta_core.device import require_cuda
from uta_core.run.folder import RunFolder, checkpoint_dir_name


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """Ray Train entry point: ``{"job": TrainJob, "plan": RunPlan, "run": RunFolder, "progress": name,
    "pool": StagePool | None}``."""
    job: TrainJob = config["job"]
    runtime = RayRuntime(job, config["run"], config["progress"], config.get("pool"))
    return train_worker(job, config["plan"], runtime, config["run"])


def loop_config(job: TrainJob, plan: RunPlan, run: RunFolder, progress: str | None,
                pool: StagePool | None = None) -> dict[str, Any]:
    return {"job": job, "plan": plan, "run": run, "progress": progress, "pool": pool}


class RayRuntime:
    def __init__(self, job: TrainJob, run: RunFolder, progress: str | None, pool: StagePool | None = None) -> None:
        cluster, self.run = job.cfg.cluster, run
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cluster.use_gpu:  # else Ray Train would hand out the CPU without a word
            require_cuda("cluster.use_gpu=true")
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(cluster.cpus_per_worker)))
        self.tasks_ahead, self.read_cpus = cluster.read_tasks, cluster.read_cpus
        self.progress = WorkerProgress(progress, active=self.rank == 0)
        self.pool, self.meter = pool, PoolMeter()
        self.watch = PoolWatch(pool) if pool is not None else None

    def read_metrics(self, steps: int, window_s: float) -> dict[str, float]:
        """Over the last ``steps`` steps (``window_s`` seconds): per step, the seconds this rank waited on the
        stage pool (the trainer's wait on its teacher); the blocks it found ready; on rank 0 the pool's
        views/s, actors, busy fraction and the actors the trainers' pace asks for (``PoolWatch``)."""
        if self.watch is None:
            return {}
        taken = self.meter.read()
        metrics = self.watch.read(taken, window_s, self.world) if self.rank == 0 else \
            {"stage_wait_s": taken.wait_s}
        metrics["stage_wait_s"] /= max(1, steps)
        return metrics

    def prepare_model(self, module: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(module)

    def read(self, reader: SourceReader, tasks: list[ReadTask]) -> Iterator[dict]:
        refs = block_refs(reader, tasks, tasks_ahead=self.tasks_ahead, num_cpus=self.read_cpus)
        if self.pool is None:
            return (ray.get(ref) for ref in refs)
        return self.pool.through(refs, self.rank, self.meter)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, step: int) -> None:
        """``ray.train.report`` on every rank (a barrier); rank 0 alone attaches the checkpoint, whose files
        the run folder lays out (checked against the lease first) and Ray Train uploads into it."""
        name = checkpoint_dir_name(step)  # rank 0's name wins (Ray broadcasts it)
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="uta-ckpt-") as folder:
            self.run.stage_checkpoint(state, step, folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)


@ray.remote
def _read_source(reader: SourceReader, item: Any, start: int, source: int) -> Iterator[dict]:
    yield from reader(item, start, source)


def block_refs(reader: SourceReader, tasks: list[ReadTask], *, tasks_ahead: int, num_cpus: float,
               blocks_ahead: int = 4) -> Iterator[ray.ObjectRef]:
    """The blocks of ``tasks`` in order (object refs), each source read by its own Ray task,
    ``tasks_ahead`` at once. The first tasks are submitted now, before the first block is asked for."""
    reader_ref = ray.put(reader)
    # "DEFAULT": never inside the placement group of the trainers (a Tune trial's captures child tasks).
    read = _read_source.options(num_cpus=num_cpus, scheduling_strategy="DEFAULT",
                                _generator_backpressure_num_objects=blocks_ahead)
    todo = iter(tasks)
    queue = collections.deque(read.remote(reader_ref, *task) for task in itertools.islice(todo, tasks_ahead))
    return _in_order(queue, todo, read, reader_ref)


def _in_order(queue: collections.deque, todo: Iterator[ReadTask], read, reader_ref) -> Iterator[ray.ObjectRef]:
    current = None
    try:
        while queue:
            current = queue.popleft()
            for task in todo:  # keep the window full while this source is consumed
                queue.append(read.remote(reader_ref, *task))
                break
            for block in current:  # not ``yield from``: closing this generator would close Ray's, which
                yield block        # raises NotImplementedError ("gen.close is not supported"); it is cancelled below
            current = None
    finally:
        for blocks in [current, *queue] if current is not None else queue:  # an epoch that ended early
            ray.cancel(blocks)

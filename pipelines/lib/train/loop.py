"""What every Ray Train worker runs, for every training job: ``train_loop_per_worker``.

Per optimiser step: ``plan.accumulation`` numpy micro-batches from this rank's Ray Data shard
-> ``task.step`` (the job's model, loss and optimiser). Every rank runs the same number of
steps (the driver computes them; ``streaming_split(equal=True)`` gives every rank the same
rows), so every rank calls ``ray.train.report`` (a barrier) equally often: at checkpoint and
evaluation steps. Metrics go to MLflow every ``run.log_every`` steps, from rank 0.

Data: pre-training's ranks read their own sources of each epoch in a replayable order
(``pipelines/lib/pretrain/data.py``, ``uta_core.data.epochs``); the contrastive stage reads
Ray Train's split of one dataset (``SplitStream``).

Resume: a checkpoint holds the position (step, epoch, micro-batches consumed in the epoch)
and, for replayable streams, every rank's cursor: a resumed rank starts right after the last
row it trained on, so the resumed epoch trains on exactly the rows the killed run had not
reached. A Ray Train split (``streaming_split`` hands out blocks dynamically) can only skip
the number of micro-batches consumed, not replay which rows they were.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipelines.lib.progress import WorkerProgress
from pipelines.lib.train.outputs import RunOutputs
from pipelines.lib.train.task import TrainTask, build_task, task_config_class
from uta_core.checkpoint import (
    Position,
    checkpoint_dir_name,
    load_state,
    load_stored_state,
    restore,
    save_state,
    stored_checkpoint_steps,
    training_state,
)
from uta_core.config import from_dict, to_dict
from uta_core.data.epochs import Cursor
from uta_core.data.prefetch import prefetched
from uta_core.data.storage import filesystem_for, join, write_bytes_atomic
from uta_core.device import require_cuda
from uta_core.distributed import mean_over_ranks
from uta_core.optim import lr_at

log = logging.getLogger("uta.train")
TRAIN_DATASET = "train"


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict | None:
    """Ray Train entry point: ``{"task": name, "config": job config dict, "plan": RunPlan dict}``.
    Returns rank 0's history and final metrics (Ray hands it to the driver)."""
    from pipelines.lib.train.trainer import RunPlan  # the driver's module, imported lazily (no cycle)

    logging.getLogger("uta").setLevel(logging.INFO)
    worker = Worker(loop_config["task"], loop_config["config"], RunPlan(**loop_config["plan"]),
                    loop_config.get("progress"))
    worker.outputs.open(worker.pos)
    worker.pos.mlflow_run_id = worker.outputs.run_id
    try:
        worker.train()
    except BaseException:
        worker.outputs.close(failed=True)
        raise
    worker.outputs.finish(worker.pos.step)
    worker.outputs.close()
    if worker.rank != 0:
        return None
    return {"history": worker.history, "final": worker.final, "mlflow_run_id": worker.outputs.run_id}


def report(metrics: dict[str, float], state: dict[str, Any] | None, step: int) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 alone attaches the checkpoint."""
    name = checkpoint_dir_name(step)  # rank 0's name wins (Ray broadcasts it)
    if state is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="uta-ckpt-") as folder:
        save_state(state, folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


class Worker:
    """One rank's task, position and metric window; ``train`` runs the epochs."""

    def __init__(self, task_name: str, cfg_dict: dict, plan, progress: str | None = None) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.progress = WorkerProgress(progress, active=self.rank == 0)
        self.cfg = from_dict(task_config_class(task_name), cfg_dict)
        if self.cfg.cluster.use_gpu:  # else Ray Train would hand out the CPU without a word
            require_cuda("cluster.use_gpu=true")
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":  # fp32 matmuls (the fp32 parts of a bf16 step) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.task_name = task_name
        torch.set_num_threads(max(1, int(self.cfg.cluster.cpus_per_worker)))
        torch.manual_seed(self.cfg.run.seed)  # the same initial model everywhere (DDP also broadcasts rank 0's)
        self.task: TrainTask = build_task(task_name, self.cfg, plan, self.device, self.rank)
        self.plan = dataclasses.replace(plan, mean=list(self.task.mean), std=list(self.task.std))
        self.pos = self._restore()
        self.outputs = RunOutputs(self.cfg, self.plan, self.task, self.rank, task_name)
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] = {}
        self._window: list[torch.Tensor] = []  # per-step losses, on the device
        self._window_start = time.perf_counter()
        self._last: dict[str, float] = {}

    def _restore(self) -> Position:
        """Continue from the newest complete checkpoint in the run folder, where Ray Train keeps
        its own (``checkpoint_<step>``), else from the one Ray Train hands over.

        A worker killed (SIGKILL, OOM, lost node) right after a report can take with it the
        report that tells Ray Train about a checkpoint already on storage; Ray would then
        restart from an older one (or from scratch). Rank 0 lists the steps, every rank loads
        the newest it can read whole.
        """
        state = None
        for step in self._agreed(stored_checkpoint_steps(self.plan.run_uri, self.cfg.s3)):
            state = load_stored_state(self.plan.run_uri, step, self.cfg.s3)
            if state is not None:
                break
        checkpoint = ray.train.get_checkpoint()
        if state is None and checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = load_state(folder)
        if state is None:
            return Position()
        pos = restore(state, self.task.model, self.task.optimizer, self.task.scheduler)
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d)", self.rank, pos.step, pos.epoch,
                 pos.micro_in_epoch)
        return pos

    def _agreed(self, steps: list[int]) -> list[int]:
        """Rank 0's list on every rank (the ranks must resume from the same step)."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return steps
        box = [steps]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ----------------------------------------------------------------- epochs
    def _stream(self):
        if self.plan.sources is not None:  # pre-training: each rank reads its own sources, replayably
            from pipelines.lib.pretrain.data import EpochStream, Sources

            rows_per_step = self.cfg.train.micro_batch * self.plan.accumulation
            return EpochStream(self.cfg, Sources(**self.plan.sources), self.rank, self.world, rows_per_step)
        return SplitStream(self.cfg, self.rank)

    def _start_cursor(self) -> Cursor:
        """Where this rank's stream of the current epoch starts: at the top, or after the checkpoint's row."""
        pos = self.pos
        if self.plan.sources is None:
            return Cursor(row=pos.micro_in_epoch)  # a Ray Train split: skip that many micro-batches
        if pos.micro_in_epoch == 0:
            return Cursor()
        if not pos.cursors or len(pos.cursors) != self.world:
            log.warning("rank %d: the checkpoint holds no cursor for %d workers; epoch %d starts over (rows of its "
                        "first %d micro-batches are trained again)", self.rank, self.world, pos.epoch,
                        pos.micro_in_epoch)
            return Cursor()
        return Cursor(**pos.cursors[self.rank])

    def train(self) -> None:
        """Epochs until ``plan.total_steps``; every rank reports (a barrier) at the same steps."""
        pos, plan = self.pos, self.plan
        stream = self._stream()
        start_step = pos.step
        self.progress.step(pos.step, {})  # where the bar starts (a resumed run: at its checkpoint)
        while pos.step < plan.total_steps:
            epoch_steps = stream.steps(pos.epoch)  # None: until the split runs out
            batches = stream.batches(pos.epoch, self._start_cursor())
            prepared = self._prepared(batches, epoch_steps)
            self._cursor, self._ids_from, self._seen_ids = None, pos.step, []
            while pos.step < plan.total_steps and (
                    epoch_steps is None or pos.micro_in_epoch // plan.accumulation < epoch_steps):
                group = []
                for _, (batch, cursor) in zip(range(plan.accumulation), prepared):
                    group.append(batch)
                    self._cursor = cursor
                if len(group) < plan.accumulation:
                    break  # the epoch is over, on every rank at once (equal splits, equal batches)
                if self.cfg.run.record_samples:
                    self._seen_ids += [int(i) for b in group for i in b["sample_id"]]
                self._step(group)
                self._after_step()
            prepared.close()
            batches.close()
            if pos.step < plan.total_steps:
                self._end_epoch(pos.micro_in_epoch // plan.accumulation)
        if pos.step == start_step:  # a rerun of a finished run: evaluate and report once
            self.final = {"step": pos.step, **self._evaluate()}
            report(self.final, None, pos.step)

    def _prepared(self, batches: Iterator[tuple[dict, Cursor]], epoch_steps: int | None) -> Iterator[tuple]:
        """This epoch's remaining micro-batches, each put through ``task.prepare`` (tensors, pinned
        memory, masks) on a thread ``train.prefetch`` micro-batches ahead of the step that uses it.
        It reads no further than the run's or the epoch's last step (the stream itself never ends)."""
        pos, acc = self.pos, self.plan.accumulation
        steps = self.plan.total_steps - pos.step
        if epoch_steps is not None:
            steps = min(steps, epoch_steps - pos.micro_in_epoch // acc)
        first_step = pos.step  # groups start at a step boundary: a position counts whole steps

        def prepare(item: tuple[int, tuple[dict, Cursor]]) -> tuple[dict, Cursor]:
            i, (batch, cursor) = item
            return self.task.prepare(batch, first_step + i // acc, i % acc), cursor

        return prefetched(enumerate(itertools.islice(batches, max(0, steps) * acc)), prepare, self.cfg.train.prefetch)

    def _step(self, group: list[dict]) -> None:
        self._last = self.task.step(group, self.pos.step)  # device tensors: read only when logging
        self._window.append(torch.as_tensor(self._last["loss"], dtype=torch.float32))
        self.pos.step += 1
        self.pos.micro_in_epoch += len(group)
        self.progress.step(self.pos.step)

    def _after_step(self) -> None:
        """Log when due; report to Ray Train (checkpoint, evaluation) when due; test fault injection.

        ``ray.train.report`` is a barrier and waits for the controller to take the result
        (it polls every ~2 s), so metrics go to MLflow every ``log_every`` steps but Ray
        only hears of checkpoints and evaluations.
        """
        cfg, pos = self.cfg, self.pos
        last = pos.step == self.plan.total_steps
        evaluate = last or bool(cfg.eval.every and pos.step % cfg.eval.every == 0)
        save = last or pos.step % cfg.run.checkpoint_every == 0
        if save or evaluate or pos.step % cfg.run.log_every == 0:
            metrics = self._window_metrics()  # an all-reduce: every rank gets here at the same steps
            if evaluate:
                metrics.update(self._evaluate())
            self.outputs.log(metrics, pos.step)
            self._progress(metrics)
            if save or evaluate:
                state = None
                if save:
                    self.pos.cursors = self._gather_cursors()
                    self._record_samples()
                if save and self.rank == 0:
                    state = training_state(self.task.model, self.task.optimizer, self.task.scheduler, pos,
                                           to_dict(cfg), dataclasses.asdict(self.plan))
                report(metrics, state, pos.step)
            if last:
                self.final = metrics
        if cfg.fail_at_step == pos.step and not pos.resumed and self.rank == 0:
            if cfg.fail_with_sigkill:  # a worker lost to the OOM killer or a dead node: no cleanup runs
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"fail_at_step={cfg.fail_at_step}: injected failure after step {pos.step}")

    def _evaluate(self) -> dict[str, float]:
        return self.task.evaluate() if self.rank == 0 else {}

    def _gather_cursors(self) -> list[dict] | None:
        """Every rank's cursor, on every rank (a collective: all ranks save at the same steps)."""
        if self._cursor is None or self.plan.sources is None:
            return None
        mine = dataclasses.asdict(self._cursor)
        if self.world == 1 or not torch.distributed.is_initialized():
            return [mine]
        everyone: list[dict | None] = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def _end_epoch(self, steps_in_epoch: int) -> None:
        if steps_in_epoch == 0:
            raise RuntimeError(
                f"epoch {self.pos.epoch} gave rank {self.rank} no full step of {self.plan.accumulation} x "
                f"{self.cfg.train.micro_batch} rows; the data shrank below one step per rank (undecodable "
                "images?): lower train.micro_batch or add data"
            )
        self._record_samples()
        self.pos.epoch += 1
        self.pos.micro_in_epoch = 0
        self.pos.cursors = None

    def _record_samples(self) -> None:
        """``run.record_samples``: the ids this rank trained on since the last record, in order, as
        ``samples/rank<r>-epoch<e>-from<step>.txt``; an epoch's files in step order are its rows."""
        if not self.cfg.run.record_samples or self.pos.step == self._ids_from:
            return
        fs, root = filesystem_for(self.plan.run_uri, self.cfg.s3)
        name = f"rank{self.rank}-epoch{self.pos.epoch:04d}-from{self._ids_from:07d}.txt"
        write_bytes_atomic(fs, join(root, "samples", name), "\n".join(map(str, self._seen_ids)).encode())
        self._ids_from, self._seen_ids = self.pos.step, []

    # ----------------------------------------------------------------- metrics
    def _window_metrics(self) -> dict[str, float]:
        """Loss averaged over the window and all ranks, throughput, lr of the last step."""
        plan, cfg = self.plan, self.cfg
        steps = max(1, len(self._window))
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        images = len(self._window) * self.task.images_per_step * self.world
        window_loss = torch.stack(self._window).sum().item() / steps if self._window else 0.0  # the one sync
        metrics = {"loss": mean_over_ranks(window_loss, self.device),
                   "images_per_s": images / seconds, "step_time_s": seconds / steps}
        if self.task.tokens_per_image is not None:
            metrics["tokens_per_s"] = images * self.task.tokens_per_image / seconds
        extra = {k: float(v) for k, v in self._last.items() if k != "loss"}
        metrics.update(extra, step=self.pos.step, epoch=self.pos.epoch,
                       lr=lr_at(self.pos.step - 1, base_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                warmup_steps=plan.warmup_steps, total_steps=plan.total_steps))
        self._window, self._window_start = [], time.perf_counter()
        return metrics

    def _progress(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.history.append({k: float(v) for k, v in metrics.items()})
        shown = ("loss", "images_per_s", "temperature", "zeroshot_top1")
        self.progress.step(self.pos.step, {k: float(metrics[k]) for k in shown if k in metrics})


class SplitStream:
    """Ray Train's split of the job's dataset (the contrastive stage): no fixed epoch length, and a
    resumed epoch skips the number of micro-batches consumed (``Cursor.row``)."""

    def __init__(self, cfg, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self.shard = ray.train.get_dataset_shard(TRAIN_DATASET)

    def steps(self, epoch: int) -> None:
        return None

    def batches(self, epoch: int, cursor: Cursor) -> Iterator[tuple[dict, Cursor]]:
        batches = self.shard.iter_batches(
            batch_size=self.cfg.train.micro_batch, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None,
            local_shuffle_seed=hash((self.cfg.run.seed, self.rank, epoch)) % 2**31,
        )
        for i, batch in enumerate(batches):
            if i >= cursor.row:
                yield batch, Cursor(row=i + 1)

"""The one training loop, for every job and every runtime: ``train_worker(job, plan, runtime)``.

Per optimiser step: ``plan.accumulation`` micro-batches of this rank's epoch stream
(``uta_core.data.stream``), each put through ``task.prepare`` on a prefetch thread, then
``uta_core.optim.train_step`` over ``task.loss`` (autocast, accumulation under DDP's no_sync,
clipping, the optimiser and schedule built here from ``cfg.optim``), then ``task.after_step``.
Every rank runs the same number of steps per epoch (``plan`` and the stream compute them from
metadata), so every rank reports (a barrier) at the same steps: checkpoints and evaluations.
Metrics go to MLflow every ``run.log_every`` steps, from rank 0.

Resume: a checkpoint holds the position (step, epoch, micro-batches in the epoch) and every
rank's cursor (source, row after the last trained), so a resumed rank starts right after
the last row it trained on: the resumed epoch trains on exactly the rows the killed run had
not reached. Rank 0 picks the newest complete checkpoint of the run folder (verified, each
damaged one skipped with one line) and every rank loads that same step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipelines.lib.progress import CONSOLE
from pipelines.lib.train.outputs import RunOutputs
from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.runtime import Runtime
from pipelines.lib.train.spec import TrainJob
from uta_core.checkpoint import Position, restore, training_state
from uta_core.config import to_dict
from uta_core.data.epochs import Cursor
from uta_core.data.prefetch import prefetched
from uta_core.data.stream import EpochStream
from uta_core.distributed import is_distributed, mean_over_ranks
from uta_core.errors import NonFiniteLoss, RunCannotContinue
from uta_core.optim import build_optimizer, build_scheduler, compiled, lr_at, train_step
from uta_core.run.folder import RunFolder

log = logging.getLogger("uta.train")


def train_worker(job: TrainJob, plan: RunPlan, runtime: Runtime, run: RunFolder) -> dict | None:
    """Train this rank to ``plan.total_steps`` and finish the run in ``run`` (its folder); rank 0 returns
    its history, final metrics and the step of the run's newest checkpoint."""
    loop = TrainLoop(job, plan, runtime, run)
    loop.start_reading()  # the first sources decode (in new processes, on a cluster) while MLflow opens
    loop.outputs.open(loop.pos)
    loop.pos.mlflow_run_id = loop.outputs.run_id
    try:
        loop.train()
    except NonFiniteLoss as err:  # every rank at the same step (the loss is all-reduced): end, do not retry
        log.error("rank %d: %s", runtime.rank, err)
        loop.outputs.close(err)
        return {"stopped": str(err), "mlflow_run_id": loop.outputs.run_id} if runtime.rank == 0 else None
    except BaseException as err:
        loop.outputs.close(err)
        raise
    loop.outputs.finish(loop.pos.step)
    loop.outputs.close()
    if runtime.rank != 0:
        return None
    return {"history": loop.history, "final": loop.final, "mlflow_run_id": loop.outputs.run_id,
            "checkpoint_step": loop.checkpoint_step}


class TrainLoop:
    """One rank's model, optimiser, position and metric window; ``train`` runs the epochs."""

    def __init__(self, job: TrainJob, plan: RunPlan, runtime: Runtime, run: RunFolder) -> None:
        cfg = self.cfg = job.cfg
        self.job, self.plan, self.runtime, self.run = job, plan, runtime, run
        self.rank, self.world, self.device = runtime.rank, runtime.world, runtime.device
        if self.device.type == "cuda":  # fp32 matmuls (the fp32 parts of a bf16 step) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.run.seed)  # the same initial model everywhere (DDP also broadcasts rank 0's)
        self.task = job.build_task(plan, self.device, self.rank)
        self.task.model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        self.forward = compiled(runtime.prepare_model(self.task.forward), cfg.train.compile)
        self.optimizer = build_optimizer(self.task.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, warmup_steps=plan.warmup_steps,
                                         total_steps=plan.total_steps)
        self.amp = torch.bfloat16 if self.device.type == "cuda" and cfg.train.precision == "bf16" else None
        self.checkpoint_step: int | None = None  # the newest checkpoint: restored from or saved
        self.pos = self._restore()
        self.stream = EpochStream(plan.sources, job.reader, runtime.read, rank=self.rank, world=self.world,
                                  seed=cfg.run.seed, shuffle_sources=cfg.data.shuffle_files,
                                  micro_batch=cfg.train.micro_batch,
                                  rows_per_step=cfg.train.micro_batch * plan.accumulation,
                                  shuffle_buffer=cfg.data.shuffle_buffer)
        self.outputs = RunOutputs(job, plan, self.task, self.rank, run)
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] = {}
        self._window: list[torch.Tensor] = []  # per-step losses, on the device
        self._window_start = time.perf_counter()
        self._last: dict[str, torch.Tensor] = {}
        self._cursor: Cursor | None = None
        self._ids_from, self._seen_ids = 0, []
        self._next_epoch: Iterator[tuple[dict, Cursor]] | None = None  # its reads already under way
        self._skipped = 0  # steps skipped for a non-finite loss (train.skip_nonfinite_steps)

    def start_reading(self) -> None:
        """Send off the reads of the epoch the run continues with."""
        if self.pos.step < self.plan.total_steps:
            self._next_epoch = self.stream.batches(self.pos.epoch, self._start_cursor())

    # ----------------------------------------------------------------- resume
    def _restore(self) -> Position:
        """Continue from the run folder's newest complete checkpoint: rank 0 finds it (verifying each
        newer one and skipping the damaged), every rank loads that step, so all resume from one step."""
        found, refused = None, None
        if self.rank == 0:
            try:
                found = self.run.newest_checkpoint()
            except RunCannotContinue as err:  # e.g. a file that would run code: every rank stops
                refused = err
        step, reason = self._agreed((found[0] if found else None, str(refused) if refused else None))
        if reason is not None:
            raise refused or RunCannotContinue(reason)
        if step is None:
            return Position()
        state = found[1] if found else self.run.load_checkpoint(step)
        pos = restore(state, self.task.model, self.optimizer, self.scheduler)
        self.checkpoint_step = step
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d)", self.rank, pos.step, pos.epoch,
                 pos.micro_in_epoch)
        return pos

    def _agreed(self, choice: tuple[int | None, str | None]) -> tuple[int | None, str | None]:
        """Rank 0's (step, refusal) on every rank."""
        if not is_distributed():
            return choice
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _start_cursor(self) -> Cursor:
        """Where this rank's stream of the current epoch starts: at the top, or after the checkpoint's row."""
        pos = self.pos
        if pos.micro_in_epoch == 0:
            return Cursor()
        if not pos.cursors or len(pos.cursors) != self.world:
            log.warning("rank %d: the checkpoint holds no cursor for %d workers; epoch %d starts over (rows of its "
                        "first %d micro-batches are trained again)", self.rank, self.world, pos.epoch,
                        pos.micro_in_epoch)
            return Cursor()
        return Cursor(**pos.cursors[self.rank])

    # ----------------------------------------------------------------- epochs
    def train(self) -> None:
        """Epochs until ``plan.total_steps``; every rank reports (a barrier) at the same steps."""
        pos, plan = self.pos, self.plan
        start_step = pos.step
        self.runtime.progress.step(pos.step, {})  # where the bar starts (a resumed run: at its checkpoint)
        if 0 < start_step < plan.total_steps and self.rank == 0:  # a rerun, or a restart after a lost node
            log.info("resumed from the checkpoint of step %d (epoch %d): the steps after it are trained again, on "
                     "the same rows", start_step, pos.epoch, extra=CONSOLE)
        while pos.step < plan.total_steps:
            epoch_steps = self.stream.steps(pos.epoch)
            batches = self._next_epoch or self.stream.batches(pos.epoch, self._start_cursor())
            self._next_epoch = None
            prepared = self._prepared(batches, epoch_steps)
            self._ids_from, self._seen_ids = pos.step, []
            while pos.step < plan.total_steps and pos.micro_in_epoch // plan.accumulation < epoch_steps:
                self._step(self._next_group(prepared, epoch_steps))
                self._after_step()
            prepared.close()
            batches.close()
            if pos.step < plan.total_steps:
                self._end_epoch()
        if pos.step == start_step:  # a rerun of a finished run: evaluate and report once
            self.final = {"step": pos.step, **self._evaluate()}
            self.runtime.report(self.final, None, pos.step)

    def _next_group(self, prepared: Iterator[tuple[dict, Cursor]], epoch_steps: int) -> list[dict]:
        """The next step's micro-batches; at the epoch's last step, the next epoch's reads go out."""
        pos, acc = self.pos, self.plan.accumulation
        group = []
        for batch, cursor in itertools.islice(prepared, acc):
            group.append(batch)
            self._cursor = cursor
        if pos.micro_in_epoch // acc + 1 == epoch_steps and pos.step + 1 < self.plan.total_steps:
            self._next_epoch = self.stream.batches(pos.epoch + 1, Cursor())  # read while this step trains
        if self.cfg.run.record_samples:
            self._seen_ids += [int(i) for b in group for i in b["sample_id"]]
        return group

    def _prepared(self, batches: Iterator[tuple[dict, Cursor]], epoch_steps: int) -> Iterator[tuple]:
        """This epoch's remaining micro-batches, each put through ``task.prepare`` on a thread
        ``train.prefetch`` micro-batches ahead of the step that uses it; it reads no further than
        the run's or the epoch's last step (the stream itself never ends)."""
        pos, acc = self.pos, self.plan.accumulation
        steps = min(self.plan.total_steps - pos.step, epoch_steps - pos.micro_in_epoch // acc)
        first_step = pos.step  # groups start at a step boundary: a position counts whole steps

        def prepare(item: tuple[int, tuple[dict, Cursor]]) -> tuple[dict, Cursor]:
            i, (batch, cursor) = item
            return self.task.prepare(batch, first_step + i // acc, i % acc), cursor

        return prefetched(enumerate(itertools.islice(batches, max(0, steps) * acc)), prepare, self.cfg.train.prefetch)

    def _step(self, group: list[dict[str, Any]]) -> None:
        losses = (lambda b=b: self.task.loss(self.forward, b) for b in group)
        skips = self.cfg.train.skip_nonfinite_steps
        out = train_step(self.forward, self.optimizer, self.scheduler, losses, len(group),
                         grad_clip=self.cfg.optim.grad_clip, autocast_dtype=self.amp, device_type=self.device.type,
                         skip_nonfinite=skips > 0)
        if "skipped" in out:
            self._skipped += 1
            log.warning("rank %d: step %d: a non-finite loss or gradient norm, the update skipped (%d of "
                        "train.skip_nonfinite_steps=%d)", self.rank, self.pos.step + 1, self._skipped, skips)
            if self._skipped > skips:
                raise NonFiniteLoss(self._nonfinite_message(self.pos.step + 1, "the loss or gradient norm"))
        else:
            self._last = {**out, **self.task.after_step()}  # device tensors: read only when logging
            self._window.append(out["loss"].float())
        self.pos.step += 1
        self.pos.micro_in_epoch += len(group)
        self.runtime.progress.step(self.pos.step)

    def _after_step(self) -> None:
        """Log when due; report (checkpoint, evaluation) when due."""
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
                self.runtime.report(metrics, self._checkpoint() if save else None, pos.step)
                self.checkpoint_step = pos.step if save else self.checkpoint_step
            if last:
                self.final = metrics

    def _checkpoint(self) -> dict[str, Any] | None:
        """Every rank's cursor into the position (a collective), the rows trained since the last
        record; rank 0's training state."""
        self.pos.cursors = self._gather_cursors()
        self._record_samples()
        if self.rank != 0:
            return None
        return training_state(self.task.model, self.optimizer, self.scheduler, self.pos, to_dict(self.cfg),
                              dataclasses.asdict(self.plan), self.task.meta())

    def _evaluate(self) -> dict[str, float]:
        return self.task.evaluate() if self.rank == 0 else {}

    def _gather_cursors(self) -> list[dict] | None:
        if self._cursor is None:
            return None
        mine = dataclasses.asdict(self._cursor)
        if not is_distributed():
            return [mine]
        everyone: list[dict | None] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def _end_epoch(self) -> None:
        self._record_samples()
        self.pos.epoch += 1
        self.pos.micro_in_epoch = 0
        self.pos.cursors = None

    def _record_samples(self) -> None:
        """``run.record_samples``: the ids this rank trained on since the last record, in order (the run
        folder's ``samples/``); an epoch's files in step order are its rows."""
        if not self.cfg.run.record_samples or self.pos.step == self._ids_from:
            return
        self.run.record_samples(self.rank, self.pos.epoch, self._ids_from, self._seen_ids)
        self._ids_from, self._seen_ids = self.pos.step, []

    # ----------------------------------------------------------------- metrics
    def _window_metrics(self) -> dict[str, float]:
        """Loss averaged over the window and all ranks, throughput, lr of the last step."""
        plan, cfg = self.plan, self.cfg
        steps = max(1, len(self._window))
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        images = len(self._window) * cfg.train.micro_batch * plan.accumulation * self.world
        window_loss = torch.stack(self._window).sum().item() / steps if self._window else 0.0  # the one sync
        metrics = {"loss": mean_over_ranks(window_loss, self.device),
                   "images_per_s": images / seconds, "step_time_s": seconds / steps}
        if self.task.tokens_per_image is not None:
            metrics["tokens_per_s"] = images * self.task.tokens_per_image / seconds
        metrics.update({k: float(v) for k, v in self._last.items() if k != "loss"})
        for name in ("loss", "grad_norm"):  # before anything is saved: no checkpoint or export of NaNs
            if name in metrics and not math.isfinite(metrics[name]):
                raise NonFiniteLoss(self._nonfinite_message(self.pos.step, f"{name} {metrics[name]}"))
        if self._skipped:
            metrics["skipped_steps"] = float(self._skipped)
        metrics.update(self.runtime.read_metrics(steps, seconds))  # e.g. the wait on the stage per step
        metrics.update(step=self.pos.step, epoch=self.pos.epoch,
                       lr=lr_at(self.pos.step - 1, base_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                warmup_steps=plan.warmup_steps, total_steps=plan.total_steps))
        self._window, self._window_start = [], time.perf_counter()
        return metrics

    def _nonfinite_message(self, step: int, what: str) -> str:
        saved = f"step {self.checkpoint_step}" if self.checkpoint_step is not None else "none"
        first = step - len(self._window) + 1 if self._window else step
        since = f"steps {first}-{step}" if first < step else f"step {step}"
        return (f"{what} is not finite in {since} of run {self.cfg.run.name}: the run stops and saves nothing "
                f"of it (last checkpoint: {saved}). Likely causes: a learning "
                f"rate too high (optim.lr={self.cfg.optim.lr:g}; a longer optim warm-up helps), "
                f"train.precision={self.cfg.train.precision} overflowing, or damaged inputs; rerun to resume with "
                "a fix, or allow skipping a few such steps with train.skip_nonfinite_steps=N")

    def _progress(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.history.append({k: float(v) for k, v in metrics.items()})
        shown = ("loss", "images_per_s", "temperature", "zeroshot_top1")
        self.runtime.progress.step(self.pos.step, {k: float(metrics[k]) for k in shown if k in metrics})

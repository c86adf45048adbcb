"""What every Ray Train worker runs for ``pipelines/pretrain.py``: ``train_loop_per_worker``.

Per optimiser step: ``accumulation`` micro-batches from this rank's Ray Data shard ->
teacher targets (online: the frozen teacher in this worker; cache: stored tokens) ->
kept indices drawn per (rank, step, micro) -> ``uta_core.train.train_step`` under DDP.
Every rank runs the same number of steps (the driver computes them from the row count;
``streaming_split(equal=True)`` gives every rank the same rows), so every rank calls
``ray.train.report`` (a barrier) equally often. Rank 0 alone writes checkpoints, talks to
MLflow, evaluates zero-shot and exports the student.

Shape legend: B micro-batch, K kept patches, N patches, D teacher embed dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from uta_core import tracking
from uta_core.config import flatten, from_dict, to_dict
from uta_core.export import export_student
from uta_core.masking import mask_generator_from_config, masking_probability, plot_masking_maps
from uta_core.pretrain_config import PretrainConfig
from uta_core.storage import filesystem_for, join, write_bytes_atomic
from uta_core.student import UTAStudent, student_from_config
from uta_core.student_eval import load_classifier, prompts, teacher_classifier, zeroshot_accuracy
from uta_core.teacher import Teacher
from uta_core.train import (
    StudentForward,
    build_optimizer,
    build_scheduler,
    draw_keep,
    lr_at,
    prepare_student,
    train_step,
)
from uta_core.train_data import TeacherTargets, load_eval_set

log = logging.getLogger("uta.pretrain")
STATE_FILE = "state.pt"
TRAIN_DATASET = "train"


@dataclass(kw_only=True)
class LoopPlan:
    """Run geometry the driver computes once and every worker shares."""

    rows_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    accumulation: int
    mean: list[float] | None  # cache mode: from the manifest; online: set by each worker's teacher
    std: list[float] | None
    run_uri: str  # <storage_path>/<name>: local absolute path or s3://
    teacher: dict[str, Any]  # what the targets come from (cache mode: the manifest's teacher)


@dataclass(kw_only=True)
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches this rank consumed in ``epoch``
    mlflow_run_id: str | None = None
    resumed: bool = False


# --------------------------------------------------------------------- building
def build_teacher(cfg: PretrainConfig, device: torch.device) -> Teacher:
    """The frozen teacher at the student's resolution; random-init weights are seeded (as the cache job)."""
    teacher_cfg = dataclasses.replace(cfg.teacher, image_size=cfg.student.img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.teacher_random_seed or 0)
        teacher = Teacher.from_config(teacher_cfg, device="cpu", s3_endpoint_url=cfg.s3.endpoint_url)
    return teacher.to(device)


def check_teacher(teacher: Teacher, student: UTAStudent) -> None:
    teacher.check_grid(student.grid, student.cfg.patch_size)
    if teacher.embed_dim != student.out_dim:
        raise ValueError(
            f"student.out_dim={student.out_dim} but the teacher's joint embed dim is {teacher.embed_dim}; "
            f"set student.out_dim={teacher.embed_dim}"
        )


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else None


# --------------------------------------------------------------------- checkpoints
def checkpoint_state(
    student: UTAStudent, optimizer, scheduler, pos: Position, cfg: PretrainConfig, plan: LoopPlan
) -> dict[str, Any]:
    return {
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": dataclasses.asdict(pos),
        "config": to_dict(cfg),
        "plan": dataclasses.asdict(plan),
    }


def load_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def report(metrics: dict[str, float], state: dict[str, Any] | None, step: int) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 alone attaches the checkpoint."""
    name = f"checkpoint_{step:07d}"  # rank 0's name wins (Ray broadcasts it)
    if state is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="uta-ckpt-") as folder:
        torch.save(state, Path(folder) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


# --------------------------------------------------------------------- rank 0 side effects
class Rank0:
    """MLflow, zero-shot evaluation and export; every method is a no-op on other ranks."""

    def __init__(self, cfg: PretrainConfig, plan: LoopPlan, rank: int, device: torch.device) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        self.active = rank == 0
        self.run_id: str | None = None
        self._run = None
        self._stack = contextlib.ExitStack()
        self._eval: tuple[torch.Tensor, torch.Tensor] | None = None
        self._classifier: torch.Tensor | None = None

    # -- MLflow
    def open(self, pos: Position, mask_gen) -> None:
        """Start the MLflow run, or reopen the checkpoint's run when resuming."""
        if not (self.active and self.cfg.tracking.enabled):
            return
        import mlflow

        if pos.mlflow_run_id:
            mlflow.set_tracking_uri(tracking.resolve_tracking_uri(self.cfg.tracking.tracking_uri))
            self._run = self._stack.enter_context(mlflow.start_run(run_id=pos.mlflow_run_id))
            mlflow.set_tag("uta.resumed_from_step", str(pos.step))
        else:
            tags = {"job": "pretrain", "uta.run_name": self.cfg.run.name,
                    "uta.teacher_mode": self.cfg.data.teacher_mode}
            self._run = self._stack.enter_context(
                tracking.start_run(self.cfg.tracking, "uta-pretrain", run_name=self.cfg.run.name, tags=tags))
            tracking.log_config(self.cfg)
            plan = {k: v for k, v in dataclasses.asdict(self.plan).items() if k not in ("mean", "std", "run_uri")}
            mlflow.log_params(tracking.redact_params(flatten(plan, "plan")))
            mlflow.log_dict(to_dict(self.cfg), "config.yaml")
            self._log_mask_map(mask_gen)
        self.run_id = self._run.info.run_id

    def _log_mask_map(self, mask_gen) -> None:
        import mlflow

        prob_HW = masking_probability(mask_gen, num_samples=2000)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "masking_probability.png"
            plot_masking_maps({f"{self.cfg.mask.strategy} ({self.cfg.mask.mask_ratio})": prob_HW}, path)
            mlflow.log_artifact(str(path))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self._run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        if failed:  # the MLflow run ends as FAILED
            self._stack.__exit__(RuntimeError, RuntimeError("training failed"), None)
        else:
            self._stack.close()
        self._run = None

    # -- zero-shot
    def zeroshot(self, student: UTAStudent, teacher: Teacher | None) -> dict[str, float]:
        ev = self.cfg.eval
        if not (self.active and ev.enabled):
            return {}
        if self._eval is None:
            self._eval = load_eval_set(ev.input, self.cfg.s3, self.cfg.student.img_size, ev.max_images)
            if ev.classifier_path is not None:
                self._classifier = load_classifier(ev.classifier_path, self.cfg.s3)["weights"]
            else:  # online mode only (the config refuses cache mode without a file)
                names, templates = prompts(ev.prompts, ev.classnames, ev.templates)
                self._classifier = teacher_classifier(teacher, names, templates)["weights"]
        pixels, labels = self._eval
        return zeroshot_accuracy(student, pixels, labels, self._classifier, self.plan.mean, self.plan.std,
                                 batch_size=ev.batch_size, device=self.device)

    # -- end of run
    def finish(self, student: UTAStudent, step: int) -> None:
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="uta-export-") as folder:
            extra = {"run_name": self.cfg.run.name, "step": step, "teacher": self.plan.teacher,
                     "teacher_mode": self.cfg.data.teacher_mode}
            export_student(student, folder, mean=tuple(self.plan.mean), std=tuple(self.plan.std), extra=extra)
            if self.cfg.run.export:
                fs, root = filesystem_for(self.plan.run_uri, self.cfg.s3)
                for name in os.listdir(folder):
                    write_bytes_atomic(fs, join(root, "export", name), (Path(folder) / name).read_bytes())
            if self._run is not None:
                import mlflow

                mlflow.log_artifacts(folder, "student")
                self._log_loss_curve(folder)

    def _log_loss_curve(self, folder: str) -> None:
        import mlflow
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        history = mlflow.tracking.MlflowClient().get_metric_history(self.run_id, "loss")
        if not history:
            return
        points = sorted((m.step, m.value) for m in history)
        fig = Figure(figsize=(5, 3.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss (-cosine)")
        ax.set_title(f"{self.cfg.run.name}: {self.cfg.objective.name}, {self.cfg.data.teacher_mode} teacher")
        path = Path(folder) / "loss_curve.png"
        fig.savefig(path, dpi=110)
        mlflow.log_artifact(str(path))


# --------------------------------------------------------------------- the loop
def record_samples(cfg: PretrainConfig, plan: LoopPlan, rank: int, epoch: int, ids: list[int]) -> None:
    fs, root = filesystem_for(plan.run_uri, cfg.s3)
    path = join(root, "samples", f"rank{rank}-epoch{epoch:04d}.txt")
    write_bytes_atomic(fs, path, "\n".join(map(str, ids)).encode())


def micro_batches(shard, cfg: PretrainConfig, skip: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one epoch, after skipping ``skip`` (a resumed epoch)."""
    batches = shard.iter_torch_batches(
        batch_size=cfg.train.micro_batch, drop_last=True,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
    )
    for i, batch in enumerate(batches):
        if i >= skip:
            yield batch


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``{"config": PretrainConfig as a dict, "plan": LoopPlan as a dict}``."""
    logging.getLogger("uta").setLevel(logging.INFO)
    worker = Worker(from_dict(PretrainConfig, loop_config["config"]), LoopPlan(**loop_config["plan"]))
    worker.rank0.open(worker.pos, worker.mask_gen)
    worker.pos.mlflow_run_id = worker.rank0.run_id
    try:
        worker.train()
    except BaseException:
        worker.rank0.close(failed=True)
        raise
    worker.rank0.finish(worker.student, worker.pos.step)
    worker.rank0.close()


class Worker:
    """One rank's model, optimiser, teacher targets and position; ``train`` runs the epochs."""

    def __init__(self, cfg: PretrainConfig, plan: LoopPlan) -> None:
        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.run.seed)  # the same initial student everywhere (DDP also broadcasts rank 0's)
        self.student = student_from_config(cfg.student)
        prepare_student(self.student, cfg.objective)
        self.student.set_grad_checkpointing(cfg.train.grad_checkpointing)
        self.student.to(self.device)
        self.optimizer = build_optimizer(self.student, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, warmup_steps=plan.warmup_steps,
                                         total_steps=plan.total_steps)
        self.pos = self._restore()
        self.teacher = None
        if cfg.data.teacher_mode == "online":
            self.teacher = build_teacher(cfg, self.device)
            check_teacher(self.teacher, self.student)
            plan = dataclasses.replace(plan, mean=list(self.teacher.mean), std=list(self.teacher.std))
        self.plan = plan
        self.targets = TeacherTargets(tuple(plan.mean), tuple(plan.std), self.teacher)
        self.forward = ray.train.torch.prepare_model(StudentForward(self.student, cfg.objective))
        self.mask_gen = mask_generator_from_config(cfg.mask, self.student.grid)
        kept = self.mask_gen.num_keep if cfg.objective.name == "uta" else self.mask_gen.num_patches
        self.tokens_per_image = 1 + kept  # student tokens through the blocks
        self.amp = autocast_dtype(cfg, self.device)
        self.rank0 = Rank0(cfg, plan, self.rank, self.device)
        self._window: list[float] = []
        self._window_start = time.perf_counter()

    def _restore(self) -> Position:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Position()
        state = load_state(checkpoint)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        pos = Position(**{**state["position"], "resumed": True})
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d)", self.rank, pos.step, pos.epoch,
                 pos.micro_in_epoch)
        return pos

    def train(self) -> None:
        """Epochs until ``plan.total_steps``; every rank reports (a barrier) at the same steps."""
        pos, plan, accum = self.pos, self.plan, self.plan.accumulation
        shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        start_step = pos.step
        while pos.step < plan.total_steps:
            stream = micro_batches(shard, self.cfg, skip=pos.micro_in_epoch)
            seen_ids: list[int] = []
            steps_this_epoch = 0
            while pos.step < plan.total_steps:
                group = [b for _, b in zip(range(accum), stream)]
                if len(group) < accum:
                    break  # the epoch is over, on every rank at once (equal splits, equal batches)
                if self.cfg.run.record_samples:
                    seen_ids += [int(i) for b in group for i in b["sample_id"]]
                self._step(group)
                steps_this_epoch += 1
                if self.cfg.run.record_samples and pos.step == plan.total_steps:
                    record_samples(self.cfg, plan, self.rank, pos.epoch, seen_ids)
                self._after_step()
            if pos.step < plan.total_steps:
                self._end_epoch(steps_this_epoch, seen_ids)
        if pos.step == start_step:  # a rerun of a finished run: evaluate and report once
            report({"step": pos.step, **self.rank0.zeroshot(self.student, self.teacher)}, None, pos.step)

    def _step(self, group: list[dict[str, torch.Tensor]]) -> None:
        step = self.pos.step

        def prepared():
            for m, batch in enumerate(group):
                images_B3HW, teacher_BND = self.targets(batch, self.device)
                keep_BK = draw_keep(self.mask_gen, images_B3HW.shape[0], seed=self.cfg.run.seed, rank=self.rank,
                                    step=step, micro=m)
                yield images_B3HW, teacher_BND, keep_BK.to(self.device)

        self._last = train_step(self.forward, self.optimizer, self.scheduler, prepared(), len(group),
                                self.cfg.objective, grad_clip=self.cfg.optim.grad_clip, autocast_dtype=self.amp)
        self._window.append(self._last["loss"])
        self.pos.step += 1
        self.pos.micro_in_epoch += len(group)

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
                metrics.update(self.rank0.zeroshot(self.student, self.teacher))
            self.rank0.log(metrics, pos.step)
            if save or evaluate:
                state = None
                if save and self.rank == 0:
                    state = checkpoint_state(self.student, self.optimizer, self.scheduler, pos, cfg, self.plan)
                report(metrics, state, pos.step)
        if cfg.fail_at_step == pos.step and not pos.resumed and self.rank == 0:
            raise RuntimeError(f"fail_at_step={cfg.fail_at_step}: injected failure after step {pos.step}")

    def _end_epoch(self, steps_this_epoch: int, seen_ids: list[int]) -> None:
        if steps_this_epoch == 0:
            raise RuntimeError(
                f"epoch {self.pos.epoch} gave rank {self.rank} no full step of {self.plan.accumulation} x "
                f"{self.cfg.train.micro_batch} rows; the data shrank below one step per rank (undecodable images?)"
            )
        if self.cfg.run.record_samples:
            record_samples(self.cfg, self.plan, self.rank, self.pos.epoch, seen_ids)
        self.pos.epoch += 1
        self.pos.micro_in_epoch = 0

    def _window_metrics(self) -> dict[str, float]:
        """Loss averaged over the window and all ranks, throughput, lr of the last step."""
        plan, cfg = self.plan, self.cfg
        images = len(self._window) * cfg.train.micro_batch * plan.accumulation * self.world
        metrics = window_metrics(sum(self._window), len(self._window), self._window_start, images,
                                 self.tokens_per_image, self.device)
        metrics.update(step=self.pos.step, epoch=self.pos.epoch, grad_norm=self._last["grad_norm"],
                       lr=lr_at(self.pos.step - 1, base_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                warmup_steps=plan.warmup_steps, total_steps=plan.total_steps))
        self._window, self._window_start = [], time.perf_counter()
        return metrics


def window_metrics(loss_sum: float, steps: int, start: float, images: int, tokens_per_image: int,
                   device: torch.device) -> dict[str, float]:
    """Mean loss over all ranks, and the window's throughput (images/s, student tokens/s)."""
    loss = torch.tensor([loss_sum / max(1, steps)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    seconds = max(time.perf_counter() - start, 1e-9)
    return {"loss": loss.item(), "images_per_s": images / seconds,
            "tokens_per_s": images * tokens_per_image / seconds, "step_time_s": seconds / max(1, steps)}

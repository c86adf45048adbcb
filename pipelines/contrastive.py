"""CLIP-loss training of an image tower and a text tower on image-caption shards (Ray Train).

    python pipelines/contrastive.py --smoke-test                       # tiny end-to-end run
    python pipelines/contrastive.py --config configs/contrastive_digits_teacher.yaml \\
        data.input.paths=outputs/digits/train run.storage_path=outputs/runs
    python pipelines/contrastive.py --config configs/contrastive_stage2.yaml \\
        model.student=outputs/runs/uta/export model.teacher.arch=ViT-B-16 model.teacher.pretrained=...

Two uses: ``model.init=scratch`` trains a small open_clip CLIP (the demo's teacher) and
writes it as ``<name>.json`` + ``<name>.pt`` for ``Teacher.from_open_clip``;
``model.init=uta_student`` is UTA's stage 2: the student export + the teacher's text tower,
fine-tuned with the temperature fixed at 0.01 (configs/contrastive_stage2.yaml).

Ray Data reads and decodes the shards (CPU tasks); each Ray Train worker draws fresh
seeded crops, tokenises captions and steps. With several workers the features are
all-gathered (with gradients) so the loss sees the global batch. Rank 0 logs to MLflow;
the final model goes to ``<storage_path>/<run.name>/model`` (scratch) or ``.../export``
(stage 2: the fine-tuned student, as pipelines/pretrain.py exports it, + ``text.pt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipelines.common import init_ray, job_parser, run_training_job, start_job
from pipelines.train_loop import STATE_FILE, load_state, report
from uta_core import tracking
from uta_core.config import from_dict, to_dict
from uta_core.contrastive import (
    ClipForward,
    ContrastiveJobConfig,
    augment,
    build_clip,
    build_stage2_model,
    caption_ids,
    caption_rows,
    clamp_logit_scale,
    clip_loss,
    clip_mean_std,
    param_groups,
    save_clip,
    set_temperature,
    temperature_of,
    tokenizer_for,
    warmup_cosine,
    zeroshot_top1,
)
from uta_core.data import to_model_input
from uta_core.export import UTA_CONFIG, export_student, load_student
from uta_core.shards import InputShard, discover
from uta_core.storage import filesystem_for, is_s3, join, s3_filesystem, write_bytes_atomic
from uta_core.teacher import Teacher
from uta_core.train_data import load_eval_set
from uta_core.zeroshot import build_classifier

log = logging.getLogger("uta.contrastive")
DEFAULT_EXPERIMENT = "uta-contrastive"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "contrastive_digits_teacher.yaml"
MODEL_DIR = "model"


# --------------------------------------------------------------------- model
def build_model(cfg: ContrastiveJobConfig):
    """(CLIP-like model, tokenizer, mean, std, image size) for ``model.init``."""
    if cfg.model.init == "scratch":
        model = build_clip(cfg.model.clip, seed=cfg.run.seed)
        mean, std = clip_mean_std(model)
        set_temperature(model, cfg.loss.temperature, learnable=cfg.loss.learnable_temperature)
        return model.train(), tokenizer_for(cfg.model.clip), mean, std, cfg.model.clip.vision["image_size"]
    teacher = Teacher.from_config(cfg.model.teacher, s3_endpoint_url=cfg.s3.endpoint_url)
    student, meta = load_student(cfg.model.student)
    if tuple(meta["mean"]) != teacher.mean or tuple(meta["std"]) != teacher.std:
        raise ValueError(
            f"the student export {cfg.model.student} was trained with mean/std {meta['mean']}/{meta['std']} "
            f"but model.teacher normalises with {teacher.mean}/{teacher.std}: use the student's teacher"
        )
    model = build_stage2_model(
        student, teacher.model, temperature=cfg.loss.temperature,
        learnable_temperature=cfg.loss.learnable_temperature,
    )
    return model, teacher.tokenizer, teacher.mean, teacher.std, student.cfg.img_size


def save_final(model: torch.nn.Module, cfg: ContrastiveJobConfig, mean, std, out: Path, step: int) -> None:
    """The trained model, ready to use: an open_clip CLIP (scratch) or a student export + text tower."""
    if cfg.model.init == "scratch":
        save_clip(model, cfg.model.clip, out)
        return
    export_student(model.visual.student, out, mean=mean, std=std,
                   extra={"stage": "contrastive", "step": step, "run": cfg.run.name})
    text = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("visual.")}
    torch.save(text, out / "text.pt")


# --------------------------------------------------------------------- data (Ray Data)
def _read_shards(batch: dict, input_cfg, s3, size: int) -> dict:
    parts = [caption_rows(InputShard(**json.loads(s)), input_cfg, s3, size) for s in batch["shard"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def build_dataset(cfg: ContrastiveJobConfig, size: int) -> ray.data.Dataset:
    shards = discover(cfg.data.input, cfg.s3).shards
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one read task per shard
    return ds.map_batches(
        _read_shards, fn_kwargs={"input_cfg": cfg.data.input, "s3": cfg.s3, "size": size},
        batch_size=1, batch_format="numpy", num_cpus=1,
    )


# --------------------------------------------------------------------- the worker loop
def _log_metrics(mlflow_run: dict | None, metrics: dict, step: int) -> None:
    """Rank 0 logs into the driver's MLflow run (by id: no active-run state in the worker)."""
    if mlflow_run is None:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
    MlflowClient(mlflow_run["uri"]).log_batch(mlflow_run["run_id"], metrics=batch)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to each rank's own rows."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))


def _publish_final(model, cfg: ContrastiveJobConfig, mean, std, step: int, run_uri: str) -> None:
    """Rank 0 writes the final model to ``<run_uri>/model`` (local or S3), as pretrain writes its export."""
    with tempfile.TemporaryDirectory(prefix="uta-contrastive-model-") as folder:
        save_final(model, cfg, mean, std, Path(folder), step)
        fs, root = filesystem_for(run_uri, cfg.s3)
        for name in sorted(os.listdir(folder)):
            write_bytes_atomic(fs, join(root, MODEL_DIR, name), (Path(folder) / name).read_bytes())


class _Worker:
    """One rank's model, optimiser and step; the epoch loop lives in ``train_loop_per_worker``."""

    def __init__(self, cfg: ContrastiveJobConfig, total: int, warmup: int) -> None:
        self.cfg = cfg
        self.model, self.tokenizer, self.mean, self.std, _ = build_model(cfg)
        self.model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        self.forward = ray.train.torch.prepare_model(ClipForward(self.model))
        self.device = ray.train.torch.get_device()
        self.bf16 = self.device.type == "cuda" and cfg.train.precision == "bf16"
        groups = param_groups(self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                              layer_decay=cfg.model.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas, eps=cfg.optim.eps)
        min_ratio = cfg.optim.min_lr / cfg.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, total=total, warmup=warmup, min_ratio=min_ratio)
        )

    def state(self, step: int, history: list) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": step, "history": history}

    def load(self, state: dict) -> tuple[int, list]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["step"], state["history"]

    def step(self, batch: dict, rng: np.random.Generator) -> tuple[float, float]:
        """One optimiser step on a numpy batch (pixels uint8 (B, H, W, 3), caption); (loss, grad norm)."""
        cfg, device = self.cfg, self.device
        pixels_BHW3 = torch.from_numpy(augment(batch["pixels"], cfg.data.views, rng))
        images_B3HW = to_model_input(pixels_BHW3, self.mean, self.std).to(device)
        captions = [str(c) for c in batch["caption"]]
        # Each distinct caption goes through the text tower once (digits: 10 per batch);
        # indexing copies the embedding, so the gradient is the same as encoding every row.
        unique, inverse_B = np.unique(np.array(captions, dtype=object), return_inverse=True)
        ids_UL = self.tokenizer([str(c) for c in unique]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            image_BD, text_UD, scale = self.forward(images_B3HW, ids_UL)
        text_BD = text_UD[torch.from_numpy(inverse_B.reshape(-1)).to(device)]
        groups_B = _gather(caption_ids(captions).to(device)) if cfg.loss.soft_targets else None
        loss = clip_loss(_gather(image_BD), _gather(text_BD), scale, groups_B)  # fp32 inside
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        clamp_logit_scale(self.model)
        return loss.item(), float(grad_norm)


def _progress(metrics: dict, total: int) -> None:
    # Not print(): Ray Train routes print through its logger, which shows every line twice.
    sys.stdout.write(f"[contrastive] step {metrics['step']}/{total} loss {metrics['loss']:.4f} "
                     f"T {metrics['temperature']:.4f} lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} steps/s\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict) -> dict | None:
    cfg = from_dict(ContrastiveJobConfig, config["cfg"])
    total = config["total_steps"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    worker = _Worker(cfg, total, config["warmup_steps"])
    checkpoint = ray.train.get_checkpoint()
    step, history = worker.load(load_state(checkpoint)) if checkpoint is not None else (0, [])
    shard = ray.train.get_dataset_shard("train")
    window, t0, epoch = [], time.perf_counter(), 0
    while step < total:
        epoch_start = step
        shuffle = cfg.data.shuffle_buffer or None
        for batch in shard.iter_batches(batch_size=cfg.train.micro_batch, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle,
                                        local_shuffle_seed=hash((cfg.run.seed, rank, epoch)) % 2**31):
            loss, grad_norm = worker.step(batch, np.random.default_rng([cfg.data.views.seed, rank, step]))
            step += 1
            window.append(loss)
            if step % cfg.run.log_every == 0 or step == total:
                metrics = {"step": step, "loss": float(np.mean(window)), "grad_norm": grad_norm,
                           "lr": worker.scheduler.get_last_lr()[0], "temperature": temperature_of(worker.model),
                           "steps_per_s": len(window) / (time.perf_counter() - t0)}
                history.append({"step": step, "loss": metrics["loss"], "temperature": metrics["temperature"]})
                window, t0 = [], time.perf_counter()
                if rank == 0:
                    _progress(metrics, total)
                    _log_metrics(config["mlflow"], metrics, step)
                save = rank == 0 and (step == total or step % cfg.run.checkpoint_every == 0)
                report(metrics, worker.state(step, history) if save else None, step)  # a barrier on every rank
            if step >= total:
                break
        if step == epoch_start:
            raise RuntimeError(f"rank {rank} got no full batch of {cfg.train.micro_batch} captioned images in "
                               "an epoch; lower train.micro_batch or add data")
        epoch += 1
    if rank == 0 and cfg.run.export:
        _publish_final(worker.model, cfg, worker.mean, worker.std, step, config["run_uri"])
    return {"history": history} if rank == 0 else None


# --------------------------------------------------------------------- the driver
def resolve_steps(cfg: ContrastiveJobConfig, ds: ray.data.Dataset) -> tuple[int, int]:
    """(total, warm-up) optimiser steps; counting the rows (a full read) only when epochs decide."""
    if cfg.train.max_steps is not None and cfg.train.warmup_steps is not None:
        return cfg.train.resolve(1)
    rows = ds.count()
    per_step = cfg.train.micro_batch * cfg.cluster.num_workers
    if rows < per_step:
        raise ValueError(
            f"the input holds {rows} captioned images, fewer than one step's batch of {per_step} "
            "(train.micro_batch x cluster.num_workers); lower train.micro_batch"
        )
    return cfg.train.resolve(rows // per_step)


def _storage(cfg: ContrastiveJobConfig) -> tuple[pafs.FileSystem | None, str]:
    if is_s3(cfg.run.storage_path):
        return s3_filesystem(cfg.s3), filesystem_for(cfg.run.storage_path, cfg.s3)[1]
    return None, os.path.abspath(cfg.run.storage_path)


def build_trainer(cfg: ContrastiveJobConfig, ds, total: int, warmup: int, mlflow_run: dict | None) -> TorchTrainer:
    fs, storage_path = _storage(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "total_steps": total, "warmup_steps": warmup,
                           "mlflow": mlflow_run, "run_uri": run_uri(cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": ds},
    )


def evaluate(cfg: ContrastiveJobConfig, model_dir: Path | None, state_file: Path) -> float | None:
    """Zero-shot top-1 on ``eval.input`` with the trained model's own text tower (driver side)."""
    ev = cfg.eval
    if ev.input is None:
        return None
    if cfg.model.init == "scratch" and model_dir is not None:  # load it exactly as a UTA teacher will
        name = cfg.model.clip.name
        teacher = Teacher.from_open_clip(str(model_dir / f"{name}.json"), str(model_dir / f"{name}.pt"))
        encode_image, encode_text = teacher.encode_image, teacher.encode_text
        mean, std, size = teacher.mean, teacher.std, teacher.image_size
    else:
        model, tokenizer, mean, std, size = build_model(cfg)
        model.load_state_dict(torch.load(state_file, weights_only=False)["model"])
        model.eval()
        encode_image = model.encode_image
        encode_text = lambda texts: model.encode_text(tokenizer(texts))  # noqa: E731
    classifier_DC = build_classifier(encode_text, ev.classnames, ev.templates)
    pixels, labels = load_eval_set(ev.input, cfg.s3, size, ev.max_images)
    return zeroshot_top1(encode_image, classifier_DC, pixels, labels, mean, std, ev.batch_size)


def run_uri(cfg: ContrastiveJobConfig) -> str:
    """``<storage_path>/<run.name>``: an absolute local path or an s3:// URI."""
    if is_s3(cfg.run.storage_path):
        return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    return os.path.join(os.path.abspath(cfg.run.storage_path), cfg.run.name)


def _local_copy(uri: str, cfg: ContrastiveJobConfig, into: str) -> Path:
    """A local folder holding ``uri``'s files (itself when local, else a download into ``into``)."""
    if not is_s3(uri):
        return Path(uri)
    fs, path = filesystem_for(uri, cfg.s3)
    pafs.copy_files(path, into, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(into)


def precheck_stage2(cfg: ContrastiveJobConfig) -> None:
    """Refuse a student export whose input size differs from the views, before any worker starts."""
    if cfg.model.init != "uta_student":
        return
    meta_path = Path(cfg.model.student) / UTA_CONFIG
    if not meta_path.is_file():
        raise ValueError(f"model.student={cfg.model.student} is not a student export ({UTA_CONFIG} is missing); "
                         "pass the export/ folder of a pipelines/pretrain.py run")
    img_size = json.loads(meta_path.read_text())["student"]["img_size"]
    if img_size != cfg.data.views.size:
        raise ValueError(f"data.views.size={cfg.data.views.size} but the student takes {img_size} px images; "
                         f"set data.views.size={img_size}")


def run(cfg: ContrastiveJobConfig) -> dict:
    """Train, publish the model, evaluate; returns the run report (see ``print_report``)."""
    precheck_stage2(cfg)
    started_ray = init_ray(cfg.cluster.address, cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
                           + cfg.cluster.data_cpus)
    start = time.perf_counter()
    try:
        with tracking.start_run(cfg.tracking, DEFAULT_EXPERIMENT, run_name=cfg.tracking.run_name or cfg.run.name,
                                tags={"job": "contrastive"}) as mlrun:
            tracking.log_config(cfg)
            mlflow_run = None if mlrun is None else {
                "uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri), "run_id": mlrun.info.run_id,
                "experiment": cfg.tracking.experiment or DEFAULT_EXPERIMENT,
            }
            report = fit_and_evaluate(cfg, mlflow_run)
            report["seconds"] = time.perf_counter() - start
            if report["zeroshot_top1"] is not None:
                tracking.log_metrics({"zeroshot_top1": report["zeroshot_top1"]})
            tracking.log_json({k: v for k, v in report.items() if k != "mlflow"}, "contrastive_report.json")
    finally:
        if started_ray:
            ray.shutdown()
    return report


def fit_and_evaluate(cfg: ContrastiveJobConfig, mlflow_run: dict | None) -> dict:
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch: noise
    ds = build_dataset(cfg, cfg.data.decode_size or cfg.data.views.size)
    total, warmup = resolve_steps(cfg, ds)
    log.info("%s: %d steps (%d warm-up) of %d images x %d workers, init=%s", cfg.run.name, total,
             warmup, cfg.train.micro_batch, cfg.cluster.num_workers, cfg.model.init)
    result = build_trainer(cfg, ds, total, warmup, mlflow_run).fit()
    history = (result.return_value or {}).get("history", [])
    model_uri = f"{run_uri(cfg)}/{MODEL_DIR}" if cfg.run.export else None
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        model_dir = _local_copy(model_uri, cfg, tmp) if model_uri else None
        top1 = evaluate(cfg, model_dir, Path(d) / STATE_FILE)
    return {
        "run": cfg.run.name, "init": cfg.model.init, "steps": total, "model": model_uri,
        "checkpoint": result.checkpoint.path, "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "temperature": history[-1]["temperature"] if history else None,
        "zeroshot_top1": top1, "mlflow": mlflow_run,
    }


# --------------------------------------------------------------------- command line
SMOKE_CLIP = [
    "model.clip.name=uta-contrastive-smoke", "model.clip.embed_dim=32",
    "model.clip.vision={image_size: 32, patch_size: 4, width: 64, layers: 2, head_width: 16}",
    "model.clip.text={context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1}",
]


def smoke_overrides(workdir: Path) -> list[str]:
    """Digits shards with captions + a tiny CLIP and a few steps, all inside ``workdir``."""
    from uta_core.digits import CLASS_NAMES, TEMPLATES, write_digits_splits

    write_digits_splits(workdir / "digits", limit=200, samples_per_shard=64)
    return SMOKE_CLIP + [
        f"data.input.paths={workdir / 'digits' / 'train'}", f"eval.input.paths={workdir / 'digits' / 'heldout'}",
        f"eval.classnames={list(CLASS_NAMES)}", f"eval.templates={list(TEMPLATES)}",
        "train.max_steps=6", "train.warmup_steps=2", "train.micro_batch=32", "run.log_every=2",
        f"run.storage_path={workdir / 'runs'}", "run.name=contrastive-smoke",
        f"cluster.cpus_per_worker={min(2, os.cpu_count() or 1)}", "cluster.data_cpus=1",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def print_report(report: dict) -> None:
    rows = [
        ("run", report["run"]), ("init", report["init"]), ("steps", report["steps"]),
        ("final loss", f"{report['final_loss']:.4f}" if report["final_loss"] is not None else "-"),
        ("temperature", f"{report['temperature']:.4f}" if report["temperature"] is not None else "-"),
        ("zero-shot top-1", f"{report['zeroshot_top1']:.1%}" if report["zeroshot_top1"] is not None else "-"),
        ("model", report["model"] or "-"), ("seconds", f"{report['seconds']:.0f}"),
    ]
    if report["mlflow"]:
        rows.append(("mlflow", f"{report['mlflow']['uri']} run {report['mlflow']['run_id']}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    smoke_help = "train a tiny CLIP for a few steps on generated digits in a temp folder"
    return job_parser(__doc__, DEFAULT_CONFIG, smoke_help, "train.max_steps=300").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = start_job(args, smoke_overrides, "contrastive")
    return run_training_job(ContrastiveJobConfig, args, overrides, run, print_report)


if __name__ == "__main__":
    sys.exit(main())

"""The contrastive stage as a function: captioned shards planned on the driver (metadata only), the
one training loop on the workers, each rank reading its own shards per epoch (as pre-training)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.lib.contrastive.config import ContrastiveJobConfig
from pipelines.lib.contrastive.task import ContrastiveTask
from pipelines.lib.train.backends import Backend, RayTrain
from pipelines.lib.train.launch import launch, resolve_paths
from pipelines.lib.train.plan import RunPlan, make_plan
from uta_core.data.captions import CaptionRows
from uta_core.data.epochs import Sources, producer_counts, spread
from uta_core.data.shards import discover
from uta_core.data.storage import filesystem_for, join, read_bytes
from uta_core.models.export import UTA_CONFIG
from uta_core.models.official import official_config_of_file
from uta_core.run.folder import RunFolder

REPORT_KEYS = ("step", "loss", "temperature", "lr", "images_per_s", "zeroshot_top1", "zeroshot_top5")


@dataclass(frozen=True)
class ContrastiveJob:
    """What the runner needs of a contrastive run (``pipelines/lib/train/spec.py``)."""

    cfg: ContrastiveJobConfig
    name = "contrastive"
    experiment = "uta-contrastive"
    artifact_name = "model"

    def reader(self, epoch: int) -> CaptionRows:
        d = self.cfg.data
        return CaptionRows(input=d.input, s3=self.cfg.s3, size=d.decode_size or d.views.size)

    def build_task(self, plan: RunPlan, device: torch.device, rank: int) -> ContrastiveTask:
        return ContrastiveTask(self.cfg, device, rank)

    def stage(self, on_pool: bool) -> None:
        return None  # reads, decodes and trains; nothing runs apart

    def run_tags(self) -> dict[str, str]:
        return {"uta.init": self.cfg.model.init}

    def run_params(self) -> dict[str, Any]:
        return {}

    def training_data(self) -> tuple[str, list[str]]:
        return "captioned shards", list(self.cfg.data.input.paths)


def caption_sources(cfg: ContrastiveJobConfig) -> Sources:
    """Captioned shards and their sample counts, from metadata only (never a pass over the data)."""
    inputs = discover(cfg.data.input, cfg.s3, "data.input.paths")
    if cfg.data.num_samples is not None:
        return Sources(items=list(inputs.shards), rows=spread(cfg.data.num_samples, len(inputs.shards)),
                       counted_from="data.num_samples")
    counts = producer_counts(inputs.fs, inputs.shards)
    if counts is None:
        raise ValueError(
            f"the number of images in {cfg.data.input.paths} is unknown and training never reads every shard to "
            "count them: set data.num_samples (the dataset's image count), or keep img2dataset's "
            "<shard>_stats.json files next to the shards")
    return Sources(items=list(inputs.shards), rows=counts, counted_from="img2dataset *_stats.json")


def precheck_stage2(cfg: ContrastiveJobConfig) -> None:
    """Refuse a student whose input size differs from the views, before any worker starts: an export's
    size is in its metadata; a released checkpoint file's in its position table (read memory-mapped)."""
    if cfg.model.init != "uta_student":
        return
    fs, root = filesystem_for(cfg.model.student, cfg.s3)  # a local folder or s3://
    if fs.get_file_info(root).is_file:
        img_size = released_image_size(cfg.model.student)
    else:
        meta = read_bytes(fs, join(root, UTA_CONFIG))
        if meta is None:
            raise ValueError(f"model.student={cfg.model.student} is not a student export ({UTA_CONFIG} is missing) nor "
                             "a released UTA checkpoint file; pass the export/ folder of a pipelines/pretrain.py run")
        if cfg.model.teacher is None:
            raise ValueError(f"model.student={cfg.model.student} is a student export: set model.teacher, the CLIP "
                             "it was pre-trained against (its text tower is fine-tuned)")
        img_size = json.loads(meta)["student"]["img_size"]
    if img_size is not None and img_size != cfg.data.views.size:
        raise ValueError(f"data.views.size={cfg.data.views.size} but the student takes {img_size} px images; "
                         f"set data.views.size={img_size}")


def released_image_size(uri: str) -> int | None:
    """A local released checkpoint's image size (patch x grid side), without reading its weights; None on S3
    (the workers check it as they load it)."""
    if "://" in uri:
        return None
    config = official_config_of_file(uri)
    if config is None:
        raise ValueError(f"model.student={uri} is a torch file without visual.* keys: not a released UTA checkpoint")
    return config.img_size


def plan_contrastive(cfg: ContrastiveJobConfig, run: RunFolder,
                     sources: Sources | None = None) -> tuple[ContrastiveJob, RunPlan]:
    sources = sources or caption_sources(cfg)
    plan = make_plan(cfg.train, cfg.cluster, sources, cfg.run.seed, cfg.data.shuffle_files, run.uri)
    return ContrastiveJob(cfg), plan


def run(cfg: ContrastiveJobConfig, backend: Backend | None = None) -> dict:
    """Train, export and evaluate on ``backend`` (default: Ray Train, on the configured cluster or a new
    local Ray); returns the run report. A misfit student and missing inputs are refused before anything
    starts (the shards are listed, metadata only, before Ray)."""
    cfg = resolve_paths(cfg)
    precheck_stage2(cfg)
    sources = caption_sources(cfg)
    plan_job = lambda folder, _: plan_contrastive(cfg, folder, sources)  # noqa: E731
    return _summary(launch(cfg, plan_job, backend or RayTrain()), cfg)


def _summary(report: dict, cfg: ContrastiveJobConfig) -> dict:
    last = report["history"][-1] if report["history"] else {}
    return {**report, "init": cfg.model.init, "model": report["export"], "final_loss": last.get("loss"),
            "temperature": last.get("temperature"), "zeroshot_top1": report["metrics"].get("zeroshot_top1")}

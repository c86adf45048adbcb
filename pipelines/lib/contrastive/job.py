"""The contrastive stage as a function: captioned shards on the driver's Ray Data, the one training loop."""

from __future__ import annotations

import json

import ray

from pipelines.lib.contrastive.config import ContrastiveJobConfig
from pipelines.lib.contrastive.data import caption_dataset, count_rows
from pipelines.lib.ray_setup import init_ray
from pipelines.lib.train.trainer import fit, local_num_cpus, make_plan, resolve_paths, run_uri
from uta_core.data.storage import filesystem_for, join, read_bytes
from uta_core.models.export import UTA_CONFIG

REPORT_KEYS = ("step", "loss", "temperature", "lr", "images_per_s", "zeroshot_top1", "zeroshot_top5")


def precheck_stage2(cfg: ContrastiveJobConfig) -> None:
    """Refuse a student export whose input size differs from the views, before any worker starts."""
    if cfg.model.init != "uta_student":
        return
    fs, root = filesystem_for(cfg.model.student, cfg.s3)  # a local folder or s3://
    meta = read_bytes(fs, join(root, UTA_CONFIG))
    if meta is None:
        raise ValueError(f"model.student={cfg.model.student} is not a student export ({UTA_CONFIG} is missing); "
                         "pass the export/ folder of a pipelines/pretrain.py run")
    img_size = json.loads(meta)["student"]["img_size"]
    if img_size != cfg.data.views.size:
        raise ValueError(f"data.views.size={cfg.data.views.size} but the student takes {img_size} px images; "
                         f"set data.views.size={img_size}")


def run(cfg: ContrastiveJobConfig) -> dict:
    """Train, export and evaluate on the configured cluster; returns the run report."""
    precheck_stage2(cfg)
    cfg = resolve_paths(cfg)
    started = init_ray(cfg.cluster.address, local_num_cpus(cfg.cluster))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch: noise
        ds = caption_dataset(cfg)
        plan = make_plan(cfg.train, cfg.cluster, count_rows(cfg, ds), run_uri(cfg))
        report = fit(cfg, "contrastive", ds, plan)
    finally:
        if started:
            ray.shutdown()
    last = report["history"][-1] if report["history"] else {}
    return {**report, "init": cfg.model.init, "model": report["export"], "final_loss": last.get("loss"),
            "temperature": last.get("temperature"), "zeroshot_top1": report["metrics"].get("zeroshot_top1")}

"""Pre-training as a function: datasets + plan on the driver, the one Ray Train loop on the workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ray

from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.pretrain.data import cache_sources, check_sources, online_sources, teacher_description
from pipelines.lib.ray_setup import init_ray
from pipelines.lib.train.trainer import RunPlan, fit, local_num_cpus, make_plan, resolve_paths, run_uri

REPORT_KEYS = ("step", "epoch", "loss", "lr", "images_per_s", "tokens_per_s", "zeroshot_top1", "zeroshot_top5")


def fit_pretrain(cfg: PretrainConfig, callbacks: Callable[[RunPlan], list] | None = None) -> dict:
    """On a connected Ray: build the data, plan the steps and train; returns the run report.
    ``callbacks`` makes the run's Ray Train callbacks from its plan (a sweep trial's report to Tune)."""
    cfg = resolve_paths(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.data.teacher_mode == "cache":
        sources, mean, std = cache_sources(cfg)
    else:
        sources, mean, std = online_sources(cfg), None, None
    check_sources(sources, cfg)
    plan = make_plan(cfg.train, cfg.cluster, sources.total_rows, run_uri(cfg), mean=mean, std=std,
                     teacher=teacher_description(cfg), sources=dataclasses.asdict(sources))
    return fit(cfg, "pretrain", None, plan, callbacks(plan) if callbacks else None)


def run(cfg: PretrainConfig) -> dict:
    """Fit on the configured cluster (a new local Ray when none is given); raises if training failed."""
    cfg = resolve_paths(cfg)  # refuses lost or unwritable outputs before Ray starts
    started = init_ray(cfg.cluster.address, local_num_cpus(cfg.cluster))
    try:
        return fit_pretrain(cfg)
    finally:
        if started:
            ray.shutdown()

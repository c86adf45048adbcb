"""The caching job's config: what to cache (``uta_core.cache.plan.CacheSpec``) + Ray + MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from uta_core.cache.plan import CacheSpec
from uta_core.tracking import TrackingConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "cache_teacher_local.yaml"


@dataclass(kw_only=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS (ray job submit), else a new local Ray
    num_cpus: int | None = None  # local Ray only; None = all cores
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if the cluster has GPUs now; cuda waits for them
    num_actors: int | None = None  # teacher actors (asked of the autoscaler); None: one per GPU present, 1 on CPU
    gpu_wait_s: float = 1800.0  # ray.device=cuda: how long to wait for the autoscaler's first GPU node
    actor_num_cpus: float | None = None  # None: 1 with GPUs; on CPU half the cores, >= 0.5
    actor_threads: int | None = None  # torch threads per actor; None: on CPU the node's cores / actors
    # Custom resources per teacher actor, e.g. {teacher: 1} offered only by the teacher nodes, so that the
    # actors run there and the decode and write tasks elsewhere.
    actor_resources: dict[str, float] = field(default_factory=dict)
    read_num_cpus: float = 1.0  # per decode/view task
    write_num_cpus: float = 0.5  # per write task (compresses and uploads part files)
    batch_size: int | None = None  # views per teacher forward; None: 256 on a GPU, 64 on CPU
    images_per_block: int = 64  # read tasks emit blocks of this many images' views
    progress_bars: bool = True  # the job's bar (shards committed, views, ETA); Ray Data's own stay off

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_actors", "actor_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or null), got {value}")
        if self.actor_num_cpus is not None and self.actor_num_cpus <= 0:
            raise ValueError(f"actor_num_cpus must be positive, got {self.actor_num_cpus}")
        bad = {k: v for k, v in self.actor_resources.items() if not (isinstance(v, (int, float)) and v > 0)}
        if bad:
            raise ValueError(f"actor_resources values must be positive numbers, got {bad}")
        if not self.gpu_wait_s >= 0:
            raise ValueError(f"gpu_wait_s must be >= 0 (seconds), got {self.gpu_wait_s}")
        if self.read_num_cpus <= 0 or self.write_num_cpus <= 0:
            raise ValueError("read_num_cpus and write_num_cpus must be positive")
        if (self.batch_size is not None and self.batch_size < 1) or self.images_per_block < 1:
            raise ValueError("batch_size and images_per_block must be at least 1")


@dataclass(kw_only=True)
class CacheConfig(CacheSpec):
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

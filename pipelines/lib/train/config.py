"""Typed settings of every Ray Train job: the run's identity, the cluster, batching and length."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from uta_core.lease import LeaseConfig

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_folder_name(key: str, name: str) -> None:
    """A run's or a sweep's name is one folder under its storage path, never a path out of it."""
    if not _RUN_NAME.fullmatch(name):
        raise ValueError(f"{key}={name!r} must be a plain folder name (letters, digits, . _ -)")


@dataclass(kw_only=True)
class RunConfig:
    """Identity and bookkeeping of one training run (pre-training or contrastive)."""

    name: str = "uta-local"  # rerunning the same name in the same storage_path resumes it
    storage_path: str = "runs"  # local folder or s3://bucket/prefix: checkpoints, export, config
    seed: int = 0
    log_every: int = 10  # optimiser steps between MLflow metrics (the loss is all-reduced over ranks)
    checkpoint_every: int = 100  # steps between checkpoints = ray.train.report calls (+ evals, the end)
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker failures Ray Train recovers from (from the last checkpoint)
    export: bool = True  # write the final model to <storage>/<name>/export
    record_samples: bool = False  # each rank writes the sample ids it trained on (<storage>/<name>/samples)
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one job at a time owns the run folder

    def __post_init__(self) -> None:
        check_folder_name("name", self.name)
        if not self.storage_path:
            raise ValueError("storage_path must be a local folder or s3://bucket/prefix")
        for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures} must be >= 0 (or -1 for unlimited)")


@dataclass(kw_only=True)
class ClusterConfig:
    address: str | None = None  # None: $RAY_ADDRESS / the job's cluster, else a new local Ray
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Logical CPUs a *new local* Ray gets on top of the workers', for the read/decode tasks
    # (with every CPU held by workers, reading would wait for a CPU forever).
    data_cpus: float = 2.0
    read_tasks: int = 2  # sources each worker reads ahead at once (one Ray task each)
    read_cpus: float = 1.0  # CPUs of each read task
    # Custom resources per worker, e.g. {trainer: 1} offered only by the trainers' node group, so that
    # the workers never take the GPUs of another group (the streamed teacher's, cluster/README.md).
    worker_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers} must be >= 1")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be positive")
        if not self.data_cpus >= 1:
            raise ValueError(f"data_cpus={self.data_cpus} must be >= 1: reading the data needs a CPU")
        if self.read_tasks < 1 or not self.read_cpus > 0:
            raise ValueError(f"read_tasks={self.read_tasks} must be >= 1 and read_cpus={self.read_cpus} positive")


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, length and warm-up of a run; ``*_steps`` (optimiser steps) win over epochs."""

    micro_batch: int = 32  # images per worker per forward
    global_batch: int | None = None  # per optimiser step; None = micro_batch x workers (no accumulation)
    epochs: float = 1.0
    warmup_epochs: float = 1.0
    max_steps: int | None = None  # total optimiser steps; the cosine spans exactly these
    warmup_steps: int | None = None
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on GPU; CPU always runs fp32
    grad_checkpointing: bool = False
    prefetch: int = 2  # micro-batches prepared ahead on a thread (tensors, pinned memory, masks); 0: none
    compile: bool = False  # torch.compile the model's forward (static shapes: K is fixed); the first steps compile
    # Steps with a NaN/inf loss or gradient norm the run may skip (no update) before it stops; 0: stop at the
    # first log step that sees one. > 0 reads the gradient norm on the host every step (a sync).
    skip_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"skip_nonfinite_steps={self.skip_nonfinite_steps} must be >= 0")
        if self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch} must be >= 0 (0: prepare each micro-batch when it is used)")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch={self.micro_batch} must be >= 1")
        if self.global_batch is not None and self.global_batch < self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} must be >= micro_batch={self.micro_batch}")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be positive")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 (or null to use epochs)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (or null to use warmup_epochs)")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step so that micro x world x accum == global batch."""
        if self.global_batch is None:
            return 1
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {world_size} workers = {per_step}; set it to a multiple of {per_step}"
            )
        return self.global_batch // per_step

    def resolve(self, steps_per_epoch: int) -> tuple[int, int]:
        """(total optimiser steps, warm-up steps) for ``steps_per_epoch`` steps an epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        total = self.max_steps if self.max_steps is not None else max(1, round(self.epochs * steps_per_epoch))
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_epochs * steps_per_epoch)
        return total, min(warmup, total - 1)


@dataclass(kw_only=True)
class PoolConfig:
    """Where and how wide a job's stage actors run (``stage_pool.py``; the streamed teacher's pool)."""

    actors: int = 1  # actors the run starts with (each builds the stage once); it waits for these
    max_actors: int | None = None  # grow to this many as nodes with the resources join (None: = actors)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # 1 on a GPU node group: each actor its own GPU
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor, e.g. {teacher: 1}
    blocks_in_flight: int = 4  # per rank: blocks sent to the pool and not yet trained on, at most
    buffer_s: float | None = None  # per rank: seconds of training the blocks in flight may hold (None: no
    # bound but blocks_in_flight); the object store holds at most ranks x buffer_s seconds of tokens
    start_timeout_s: float = 600.0  # then: the actors' resources never appeared; fail with the fix
    # A rank waits this long for a block while no actor runs (their nodes lost), saying so once a minute;
    # then the run stops with one line and a rerun resumes from its last checkpoint. None: wait for ever.
    wait_s: float | None = 1800.0

    def __post_init__(self) -> None:
        if self.actors < 1 or self.blocks_in_flight < 1:
            raise ValueError(f"actors={self.actors} and blocks_in_flight={self.blocks_in_flight} must be >= 1")
        if not self.cpus_per_actor > 0 or self.gpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor={self.cpus_per_actor} must be positive, gpus_per_actor >= 0")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise ValueError(f"max_actors={self.max_actors} must be >= actors={self.actors} (or null: no growth)")
        if self.wait_s is not None and not self.wait_s > 0:
            raise ValueError(f"wait_s={self.wait_s} must be positive (or null: wait for nodes for ever)")
        if self.buffer_s is not None and not self.buffer_s > 0:
            raise ValueError(f"buffer_s={self.buffer_s} must be positive (or null: blocks_in_flight alone)")

    @property
    def most_actors(self) -> int:
        return self.max_actors if self.max_actors is not None else self.actors

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def wants(self) -> str:
        parts = [f"{self.cpus_per_actor:g} CPU"] + ([f"{self.gpus_per_actor:g} GPU"] if self.gpus_per_actor else [])
        return " + ".join(parts + [f"{v:g} {k}" for k, v in self.resources.items()])

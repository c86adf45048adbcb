"""The run's geometry, computed once on the driver from metadata and shared by every worker."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.lib.train.config import ClusterConfig, TrainConfig
from uta_core.data.epochs import Sources, epoch_steps


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    sources: Sources  # what the ranks read, epoch by epoch (uta_core.data.stream)
    steps_per_epoch: int  # epoch 0's; every epoch gives every rank the smallest rank's whole steps
    total_steps: int
    warmup_steps: int
    accumulation: int  # micro-batches per optimiser step
    run_uri: str  # <storage_path>/<name>: local absolute path or s3://

    def summary(self) -> dict:
        """What MLflow and the log show (the source lists stay in config.yaml)."""
        return {"rows_per_epoch": self.sources.total_rows, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "accumulation": self.accumulation, "sources": self.sources.summary()}


def make_plan(train: TrainConfig, cluster: ClusterConfig, sources: Sources, seed: int, shuffle_files: bool,
              run_uri: str) -> RunPlan:
    """Steps of the run; refuses data that cannot give every rank a source and a whole step."""
    world = cluster.num_workers
    if len(sources.items) < world:
        raise ValueError(f"{len(sources.items)} input shard(s) for cluster.num_workers={world}: each worker reads "
                         "its own shards; use fewer workers or write the data into more shards")
    accumulation = train.accumulation(world)
    rows_per_step = train.micro_batch * accumulation
    steps = epoch_steps(sources.rows, seed, 0, shuffle_files, world, rows_per_step)
    if steps < 1:
        raise ValueError(f"a worker's share of the {sources.total_rows} rows is less than one step of "
                         f"{rows_per_step} rows; lower train.micro_batch / train.global_batch or use fewer workers")
    total, warmup = train.resolve(steps)
    return RunPlan(sources=sources, steps_per_epoch=steps, total_steps=total, warmup_steps=warmup,
                   accumulation=accumulation, run_uri=run_uri)

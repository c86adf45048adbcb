"""What the training loop needs from where it runs, and the in-process implementation.

The loop (``loop.py``) talks to its surroundings only through a ``Runtime``: which rank it is,
its device, how a model is prepared for several ranks, how a rank's sources are read, and where a
report and a checkpoint go (the run folder decides which checkpoint a run resumes from). On a
cluster that is Ray Train (``ray_runtime.py``); ``LocalRuntime`` runs the same loop in this
process (one rank), or in a few local processes joined by gloo (a test of several ranks), with
no Ray at all: tests of resume, cursors and epoch ends take seconds, and a step can be profiled
without Ray in the picture.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipelines.lib.train.spec import BlockWork
from uta_core.data.stream import ReadTask, SourceReader, serial_read
from uta_core.run.folder import RunFolder

log = logging.getLogger("uta.train")


class Progress(Protocol):
    def step(self, step: int, metrics: dict[str, float] | None = None) -> None: ...


class Runtime(Protocol):
    rank: int
    world: int
    device: torch.device
    progress: Progress

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """The module on this rank's device, wrapped for gradient all-reduce when there are several ranks."""

    def read(self, reader: SourceReader, tasks: list[ReadTask]) -> Iterator[dict]:
        """The blocks of ``tasks`` (this rank's sources), in order, through the job's stage if it has one."""

    def read_metrics(self, steps: int, window_s: float) -> dict[str, float]:
        """Over the last ``steps`` steps (``window_s`` seconds): what reading cost the trainer, per step
        (``stage_wait_s``: seconds waited on the stage), and what the stage's pool reports."""

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, step: int) -> None:
        """Every rank at the same steps: metrics, and rank 0's checkpoint state (None on other ranks and
        between checkpoints), saved into the run folder."""


class NoProgress:
    def step(self, step: int, metrics: dict[str, float] | None = None) -> None:
        pass


class LocalRuntime:
    """The loop in this process. ``world`` > 1: one process per rank, joined by gloo through
    ``init_method`` (e.g. ``file:///tmp/x``); checkpoints go into the run folder, as Ray Train names
    them, and the newest ``keep`` are kept."""

    def __init__(self, run: RunFolder, keep: int, *, rank: int = 0, world: int = 1,
                 init_method: str | None = None, threads: int | None = None, timeout_s: float = 600,
                 stage: BlockWork | None = None) -> None:
        self.rank, self.world, self.device = rank, world, torch.device("cpu")
        self.stage, self._stage_fn, self._stage_s = stage, None, 0.0  # the stage runs inline, built on first use
        self.run, self.keep = run, keep
        self.progress: Progress = NoProgress()
        if threads is not None:
            torch.set_num_threads(threads)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))

    def prepare_model(self, module: nn.Module) -> nn.Module:
        module.to(self.device)
        return nn.parallel.DistributedDataParallel(module) if self.world > 1 else module

    def read(self, reader: SourceReader, tasks: list[ReadTask]) -> Iterator[dict]:
        blocks = serial_read(reader, tasks)
        return blocks if self.stage is None else self._through_stage(blocks)

    def _through_stage(self, blocks: Iterator[dict]) -> Iterator[dict]:
        if self._stage_fn is None:
            self._stage_fn = self.stage.open()
        for block in blocks:
            start = time.perf_counter()
            out = self._stage_fn(block)
            self._stage_s += time.perf_counter() - start
            yield {**block, **out}

    def read_metrics(self, steps: int, window_s: float) -> dict[str, float]:
        if self.stage is None:
            return {}
        spent, self._stage_s = self._stage_s, 0.0
        return {"stage_wait_s": spent / max(1, steps)}

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, step: int) -> None:
        if state is not None:
            self.run.save_checkpoint(state, step, self.keep)
        if self.world > 1:
            dist.barrier()  # as ray.train.report: no rank runs ahead of a checkpoint

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

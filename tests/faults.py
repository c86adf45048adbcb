"""Fault injection for the fault trials, from the tests' side: a training job whose task fails once.

``FaultyJob(job, Fault(step=3, kind="sigkill", once=path))`` wraps a ``TrainJob``: right after optimiser
step 3 (its report and checkpoint done), rank 0's task SIGKILLs its own process (a worker lost to the
OOM killer or a dead node: no cleanup runs), or raises (``kind="raise"``); ``kind="nan"`` makes every
rank's loss NaN at step 3 (a diverged run). ``once`` is a marker file the fault creates when it
strikes, so the attempt that resumes runs clean. ``faulty_plans`` wraps what a job's planner returns,
for a test to ``monkeypatch`` into the job module; nothing in the production code knows of it.

Ray pickles this module by value to its workers (the tests folder is not a package they import).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
STEP_KEY = "_fault_step"


@dataclass(frozen=True, kw_only=True)
class Fault:
    step: int
    once: Path  # created when it strikes (per rank for "nan")
    kind: Literal["raise", "sigkill", "nan"] = "raise"

    def marker(self, rank: int) -> Path:
        return self.once.with_name(f"{self.once.name}.rank{rank}") if self.kind == "nan" else self.once

    def due(self, step: int, rank: int) -> bool:
        """Strike now (and never again): the NaN at ``step``, the others as step ``step + 1`` starts."""
        at = self.step if self.kind == "nan" else self.step + 1
        if step != at or (self.kind != "nan" and rank != 0) or self.marker(rank).exists():
            return False
        self.marker(rank).touch()
        return True


class _Delegate:
    _inner_name = ""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == self._inner_name:  # unpickling looks things up before __init__
            raise AttributeError(name)
        return getattr(getattr(self, self._inner_name), name)


class FaultyTask(_Delegate):
    _inner_name = "task"

    def __init__(self, task: Any, fault: Fault, rank: int) -> None:
        self.task, self.fault, self.rank = task, fault, rank

    def prepare(self, batch: dict, step: int, micro: int) -> dict:
        return {**self.task.prepare(batch, step, micro), STEP_KEY: step + 1}

    def loss(self, forward: Any, batch: dict) -> Any:
        step = batch.pop(STEP_KEY)
        if self.fault.due(step, self.rank):
            if self.fault.kind == "nan":
                return self.task.loss(forward, batch) * float("nan")
            if self.fault.kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure after step {self.fault.step}")
        return self.task.loss(forward, batch)


class FaultyJob(_Delegate):
    _inner_name = "job"

    def __init__(self, job: Any, fault: Fault) -> None:
        self.job, self.fault = job, fault

    def build_task(self, plan: Any, device: Any, rank: int) -> FaultyTask:
        return FaultyTask(self.job.build_task(plan, device, rank), self.fault, rank)


def faulty_plans(planner: Any, fault: Fault) -> Any:
    """``planner`` (a job module's ``plan_*``), its job wrapped in ``FaultyJob``."""
    def plan(*args: Any, **kwargs: Any) -> tuple[FaultyJob, Any]:
        job, run_plan = planner(*args, **kwargs)
        return FaultyJob(job, fault), run_plan

    return plan

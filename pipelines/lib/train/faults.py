"""Fault injection for the fault trials (tests), kept out of the jobs' configs.

``UTA_FAULT_AT_STEP=3`` makes rank 0 fail right after optimiser step 3 of a run that has not
resumed yet; ``UTA_FAULT=sigkill`` makes its process SIGKILL itself (a worker lost to the OOM
killer or a dead node: no cleanup runs) instead of raising; ``UTA_FAULT=nan`` makes every rank's
loss NaN at that step (a diverged run). The driver reads the variables and
hands the fault to the workers with the loop's arguments, so it reaches a Ray worker whatever
environment the worker was started with.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Literal

STEP_ENV, KIND_ENV = "UTA_FAULT_AT_STEP", "UTA_FAULT"


@dataclass(frozen=True, kw_only=True)
class Fault:
    step: int
    kind: Literal["raise", "sigkill", "nan"] = "raise"

    @classmethod
    def from_env(cls) -> Fault | None:
        step = os.environ.get(STEP_ENV)
        if not step:
            return None
        kind = os.environ.get(KIND_ENV, "raise")
        if kind not in ("raise", "sigkill", "nan"):
            raise ValueError(f"{KIND_ENV}={kind!r} must be raise, sigkill or nan")
        return cls(step=int(step), kind=kind)

    def poisons(self, step: int, resumed: bool) -> bool:
        """A NaN loss at this step (every rank), in an attempt that has not resumed."""
        return self.kind == "nan" and step == self.step and not resumed

    def strike(self, step: int, rank: int, resumed: bool) -> None:
        """Fail here if this is the step, on rank 0, of an attempt that has not resumed."""
        if step != self.step or rank != 0 or resumed or self.kind == "nan":
            return
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{STEP_ENV}={self.step}: injected failure after step {step}")

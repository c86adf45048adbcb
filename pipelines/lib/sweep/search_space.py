"""Search spaces for sweeps, as YAML: which config keys vary, how, and what to optimise.

    metric: zeroshot_top1          # a metric the training job reports
    mode: max
    num_samples: 1                 # repeats of the grid (x random draws for distributions)
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}  # max_t: cap in reports
    fixed:                         # dotted overrides shared by every trial
      train.max_steps: 200
    params:                        # dotted config keys -> one distribution each
      mask.strategy: {grid: [random, block, block_reversed, gaussian]}
      mask.mask_ratio: {grid: [0.4, 0.5, 0.75]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}

Distributions: grid (every value, crossed with other grids), choice (one at random),
uniform [lo, hi], loguniform [lo, hi] (0 < lo), randint [lo, hi) . This module only
parses and validates; turning a space into Ray Tune objects is the sweep pipeline's job.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from uta_core.config import apply_overrides, from_dict, load_config

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    kind: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, key: str, spec: Any) -> ParamSpec:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"params.{key} must be one of {{{', '.join(KINDS)}}}: VALUES, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if kind not in KINDS:
            raise ValueError(f"params.{key}: unknown distribution {kind!r}; use one of {list(KINDS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"params.{key}.{kind} must be a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ValueError(f"params.{key}.{kind} must be [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"params.{key}.loguniform needs low > 0, got {values[0]}")
        return cls(kind=kind, values=tuple(values))


@dataclass(kw_only=True)
class SchedulerConfig:
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # in reports (evaluations) before a trial can be stopped
    reduction_factor: int = 2
    max_t: int | None = None  # stop every trial after this many reports (a budget cap); None: no cap

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ValueError(f"max_t must be >= grace_period ({self.grace_period}), got {self.max_t}")


@dataclass(kw_only=True)
class SearchSpace:
    metric: str = "zeroshot_top1"
    mode: Literal["min", "max"] = "max"
    num_samples: int = 1
    # Trials at once (the CLI's --max-concurrent wins); None: as many as the cluster holds now or,
    # on a GPU cluster that has no GPU yet (nodes scaled from zero), every trial: the autoscaler
    # adds nodes for their placement groups up to its own maximum.
    max_concurrent_trials: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1 (or null), got {self.max_concurrent_trials}")
        if not self.params:
            raise ValueError("params is empty: name at least one config key to vary")
        self.params = {key: ParamSpec.parse(key, spec) for key, spec in self.params.items()}
        clash = sorted(set(self.params) & set(self.fixed))
        if clash:
            raise ValueError(f"{clash[0]!r} is both in fixed and in params; keep it in one")

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if p.kind == "grid")

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.num_samples

    def fixed_overrides(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.fixed.items()]

    def example_overrides(self) -> list[list[str]]:
        """One override list per grid point, non-grid params at their first/low value."""
        grid_keys = [k for k, p in self.params.items() if p.kind == "grid"]
        other = {k: p.values[0] for k, p in self.params.items() if p.kind != "grid"}
        points = itertools.product(*(self.params[k].values for k in grid_keys))
        return [
            self.fixed_overrides()
            + [f"{k}={_yaml_scalar(v)}" for k, v in zip(grid_keys, point)]
            + [f"{k}={_yaml_scalar(v)}" for k, v in other.items()]
            for point in points
        ]

    def validate_against(self, config_cls: type, base: dict[str, Any]) -> None:
        """Build ``config_cls`` for every grid point: a wrong key or value fails before any trial."""
        for overrides in self.example_overrides():
            try:
                from_dict(config_cls, apply_overrides(base, overrides))
            except ValueError as err:
                raise ValueError(f"search space does not fit the training config: {err}") from None


def load_search_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchSpace:
    return load_config(SearchSpace, path, overrides)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)

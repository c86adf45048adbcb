"""Search spaces for sweeps, as YAML: which config keys vary, how, and what to optimise.

    metric: zeroshot_top1          # a metric the training job reports
    mode: max
    num_samples: 1                 # repeats of the grid (x random draws for distributions)
    seeds: 5                       # run.seed 0..4 for every arm: the report's n, intervals and paired differences
    baseline: {mask.mask_ratio: 0.0}  # the arm the others are compared with (default: the first arm)
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}  # max_t: cap in reports
    fixed:                         # dotted overrides shared by every trial
      train.max_steps: 200
    params:                        # dotted config keys -> one distribution each
      mask.strategy: {grid: [random, block, block_reversed, gaussian]}
      mask.mask_ratio: {grid: [0.4, 0.5, 0.75]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}

Distributions: grid (every value, crossed with other grids), choice (one at random),
uniform [lo, hi], loguniform [lo, hi] (0 < lo), randint [lo, hi) . An *arm* is one setting of
every parameter but the seed (``run.seed``, from ``seeds: N`` or a grid of its own); the trials of
an arm differ only in their seed. This module only parses and validates; turning a space into Ray
Tune objects is the sweep pipeline's job.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from uta_core.config import apply_overrides, from_dict, load_config

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SEED_KEY = "run.seed"


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
    seeds: int | None = None  # N: run.seed over 0..N-1 for every arm (the same N seeds: paired differences)
    baseline: dict[str, Any] | None = None  # the arm others are compared with; None: the first arm
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
        if self.seeds is not None:
            if self.seeds < 1:
                raise ValueError(f"seeds must be >= 1 (or null), got {self.seeds}")
            if SEED_KEY in self.params or SEED_KEY in self.fixed:
                raise ValueError(f"seeds: {self.seeds} and {SEED_KEY} in params/fixed both set the seed; keep one")
            self.params[SEED_KEY] = ParamSpec(kind="grid", values=tuple(range(self.seeds)))
        clash = sorted(set(self.params) & set(self.fixed))
        if clash:
            raise ValueError(f"{clash[0]!r} is both in fixed and in params; keep it in one")
        if self.baseline is not None:
            self._check_baseline(self.baseline)

    def _check_baseline(self, baseline: dict[str, Any]) -> None:
        for key, value in baseline.items():
            spec = self.params.get(key)
            if key == SEED_KEY or spec is None or spec.kind != "grid":
                keys = [k for k in self.arm_keys if self.params[k].kind == "grid"]
                raise ValueError(f"baseline names {key!r}, which is not a grid parameter of this space; "
                                 f"name one of {keys}")
            if value not in spec.values:
                raise ValueError(f"baseline {key}={value!r} is not one of the grid's values {list(spec.values)}")

    @property
    def arm_keys(self) -> list[str]:
        """The parameters that make an arm: every parameter but the seed."""
        return [k for k in self.params if k != SEED_KEY]

    @property
    def has_seeds(self) -> bool:
        return SEED_KEY in self.params

    @property
    def unique_labels(self) -> bool:
        """Every trial has its own parameters (a grid, one sample): a trial's label names it."""
        return self.num_samples == 1 and all(p.kind == "grid" for p in self.params.values())

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if p.kind == "grid")

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.num_samples

    def fixed_overrides(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.fixed.items()]

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid point as ``{key: value}`` (the grid keys only), in the order the space lists them."""
        keys = [k for k, p in self.params.items() if p.kind == "grid"]
        return [dict(zip(keys, point)) for point in itertools.product(*(self.params[k].values for k in keys))]

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


_SHORT = {"mask.strategy": "", "mask.mask_ratio": "r", "objective.name": "", SEED_KEY: "s"}


def trial_label(params: dict[str, Any]) -> str:
    """A trial's or an arm's name from its parameters, e.g. ``block_reversed-r0.5-s1`` (MLflow's run names,
    the report's arms): the strategy and objective as they are, ``r`` the mask ratio, any other key by its
    last part (``lr0.001``), ``s`` the seed last; in that order whatever the space's order."""
    first = [k for k in _SHORT if k in params and k != SEED_KEY]
    ordered = first + [k for k in params if k not in _SHORT] + [k for k in (SEED_KEY,) if k in params]
    parts = []
    for key, value in ((k, params[k]) for k in ordered):
        prefix = _SHORT.get(key, key.rsplit(".", 1)[-1])
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(prefix + text.replace("/", "_").replace(" ", ""))
    return "-".join(parts) or "default"


def trial_run_name(params: dict[str, Any], trial_id: str, unique: bool) -> str:
    """A trial's MLflow run name: its label, and its trial number where labels repeat (random draws, samples)."""
    label = trial_label(params)
    return label if unique else f"{label}-{trial_id.rsplit('_', 1)[-1]}"


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

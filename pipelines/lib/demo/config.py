"""The demo's config: digits, the claim it checks, and one section of overrides per stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uta_core.config import apply_overrides, deep_merge, from_dict, read_yaml

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEFAULT_CONFIG = CONFIGS / "demo.yaml"
STAGE_DEFAULTS = {
    "teacher": CONFIGS / "contrastive_digits_teacher.yaml",
    "cache": CONFIGS / "cache_teacher_local.yaml",
    "student": CONFIGS / "pretrain_local.yaml",
}


@dataclass(kw_only=True)
class DigitsConfig:
    size: int = 32
    heldout_fraction: float = 0.2
    samples_per_shard: int = 256
    seed: int = 0
    limit: int | None = None  # cap on images (of 1,797) before the split

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must lie in (0, 1)")


@dataclass(kw_only=True)
class Expectation:
    """The claim the demo checks and prints a verdict on (it does not change the exit code)."""

    min_ratio: float = 0.95  # UTA student / teacher zero-shot top-1
    max_control: float = 0.25  # the untrained student stays near chance (10%)


@dataclass(kw_only=True)
class DemoConfig:
    out: str = "outputs/demo"
    ray_cpus: int = 3  # logical CPUs of the local Ray: training workers + one for reading the data
    experiment: str = "uta-demo"
    tracking_uri: str | None = None  # None: sqlite:///<out>/mlflow.db
    control_seed: int = 1234
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    teacher: dict[str, Any] = field(default_factory=dict)  # overrides of contrastive_digits_teacher.yaml
    cache: dict[str, Any] = field(default_factory=dict)  # overrides of cache_teacher_local.yaml
    student: dict[str, Any] = field(default_factory=dict)  # overrides of pretrain_local.yaml
    expect: Expectation = field(default_factory=Expectation)

    def __post_init__(self) -> None:
        if self.ray_cpus < 2:
            raise ValueError(f"ray_cpus={self.ray_cpus} must be >= 2: a training worker and a read task")


def load_demo_config(path: Path, overrides: list[str]) -> DemoConfig:
    return from_dict(DemoConfig, apply_overrides(read_yaml(path), overrides))


def stage_config(cls: type, stage: str, wiring: Mapping[str, Any], user: Mapping[str, Any]):
    """A stage's default YAML, then the demo's wiring (paths between stages), then the user's section."""
    data = read_yaml(STAGE_DEFAULTS[stage])
    try:
        return from_dict(cls, deep_merge(deep_merge(data, wiring), user))
    except ValueError as err:
        raise ValueError(f"{stage}: {err}") from None


@dataclass(kw_only=True)
class Paths:
    work: Path
    tracking_uri: str
    student_run: str = "demo-student"  # the pretrain run.name (its export is <work>/<run.name>/export)

    @property
    def digits(self) -> Path:
        return self.work / "digits"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def classifier(self) -> Path:
        return self.work / "classifier.pt"

    @property
    def student_export(self) -> Path:
        return self.work / self.student_run / "export"

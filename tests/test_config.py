"""Config loading: YAML + dotted overrides, strict keys and types."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from uta_core.config import apply_overrides, flatten, from_dict, load_config, save_config, to_dict


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    mode: Literal["cache", "online"] = "cache"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class Outer:
    name: str = "run"
    steps: int = 10
    paths: list[str] = field(default_factory=list)
    address: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ninner:\n  lr: 0.1\n")
    cfg = load_config(Outer, path, ["inner.lr=2e-4", "steps=5", "paths=[x, y]", "inner.betas=[0.8, 0.9]"])
    assert cfg == Outer(name="a", steps=5, paths=["x", "y"], inner=Inner(lr=2e-4, betas=(0.8, 0.9)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["inner.lrr=1"], "unknown config key 'inner.lrr'"),
        (["stepz=1"], "unknown config key 'stepz'"),
        (["steps=1.5"], "steps must be an integer"),
        (["steps=true"], "steps must be an integer"),
        (["inner.lr=-1"], "inner: lr must be positive"),
        (["inner.mode=offline"], r"inner.mode must be one of \['cache', 'online'\]"),
        (["inner.betas=[1]"], "inner.betas must have 2 items"),
        (["name"], "key=value"),
    ],
)
def test_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(Outer, None, overrides)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_optional_and_int_to_float():
    cfg = from_dict(Outer, {"address": None, "inner": {"lr": 1}})
    assert cfg.address is None and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)


def test_round_trip_and_flatten(tmp_path):
    cfg = Outer(paths=["a"], inner=Inner(lr=0.5))
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(Outer, tmp_path / "r.yaml") == cfg
    flat = flatten(to_dict(cfg))
    assert flat["inner.lr"] == 0.5 and flat["inner.betas"] == [0.9, 0.98]


def test_override_into_a_value_is_refused():
    with pytest.raises(ValueError, match="'steps' is a value, not a section"):
        apply_overrides({"steps": 1}, ["steps.x=1"])


def test_float_written_as_exponent_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-3\n")
    assert load_config(Outer, path).inner.lr == 1e-3
    with pytest.raises(ValueError, match="inner.lr must be a number, got 'fast'"):
        load_config(Outer, None, ["inner.lr=fast"])


def test_overrides_do_not_mutate_input():
    data = {"inner": {"lr": 1.0}}
    apply_overrides(data, ["inner.lr=2"])
    assert data == {"inner": {"lr": 1.0}}

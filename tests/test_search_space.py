"""Search-space YAML: distributions, grid size, strict validation."""

from dataclasses import dataclass, field

import pytest

from pipelines.lib.sweep.search_space import load_search_space


@dataclass(kw_only=True)
class Mask:
    strategy: str = "random"
    mask_ratio: float = 0.5

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass(kw_only=True)
class Train:
    mask: Mask = field(default_factory=Mask)
    lr: float = 1e-3
    steps: int = 10


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_grid_crossed_and_fixed(tmp_path):
    space = load_search_space(write(tmp_path, """
metric: loss
mode: min
num_samples: 2
fixed: {steps: 5}
params:
  mask.strategy: {grid: [random, block]}
  mask.mask_ratio: {grid: [0.4, 0.5, 0.75]}
  lr: {loguniform: [1.0e-4, 1.0e-2]}
"""))
    assert space.grid_size == 6 and space.num_trials == 12
    examples = space.example_overrides()
    assert len(examples) == 6
    assert examples[0] == ["steps=5", "mask.strategy=random", "mask.mask_ratio=0.4", "lr=0.0001"]
    space.validate_against(Train, {})


@pytest.mark.parametrize("params, match", [
    ("{lr: {normal: [0, 1]}}", "unknown distribution 'normal'"),
    ("{lr: {uniform: [1, 0]}}", "low < high"),
    ("{lr: {loguniform: [0, 1]}}", "low > 0"),
    ("{lr: {grid: []}}", "non-empty list"),
    ("{lr: 0.1}", "must be one of"),
    ("{}", "params is empty"),
])
def test_bad_distributions(tmp_path, params, match):
    with pytest.raises(ValueError, match=match):
        load_search_space(write(tmp_path, f"params: {params}\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'metrics'"):
        load_search_space(write(tmp_path, "metrics: loss\nparams: {lr: {grid: [1]}}\n"))


def test_space_that_does_not_fit_the_config_is_refused(tmp_path):
    bad_key = load_search_space(write(tmp_path, "params: {mask.ratio: {grid: [0.5]}}\n"))
    with pytest.raises(ValueError, match="unknown config key 'mask.ratio'"):
        bad_key.validate_against(Train, {})
    bad_value = load_search_space(write(tmp_path, "params: {mask.mask_ratio: {grid: [0.5, 1.0]}}\n"))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        bad_value.validate_against(Train, {})


def test_fixed_and_params_clash(tmp_path):
    with pytest.raises(ValueError, match="both in fixed and in params"):
        load_search_space(write(tmp_path, "fixed: {lr: 1}\nparams: {lr: {grid: [1, 2]}}\n"))


def test_scheduler_max_t_below_grace_period_is_refused(tmp_path):
    space = load_search_space(write(tmp_path, "scheduler: {max_t: 4}\nparams: {lr: {grid: [1]}}\n"))
    assert space.scheduler.max_t == 4
    with pytest.raises(ValueError, match=r"max_t must be >= grace_period \(2\)"):
        load_search_space(write(tmp_path, "scheduler: {grace_period: 2, max_t: 1}\nparams: {lr: {grid: [1]}}\n"))


def test_seeds_are_a_grid_of_run_seed_and_arms_are_the_rest(tmp_path):
    space = load_search_space(write(tmp_path, """
seeds: 3
baseline: {mask.mask_ratio: 0.4}
params:
  mask.mask_ratio: {grid: [0.0, 0.4, 0.7]}
"""))
    assert space.params["run.seed"].values == (0, 1, 2)
    assert space.num_trials == 9 and space.arm_keys == ["mask.mask_ratio"] and space.unique_labels
    assert space.grid_points()[:2] == [{"mask.mask_ratio": 0.0, "run.seed": 0},
                                       {"mask.mask_ratio": 0.0, "run.seed": 1}]
    five = load_search_space(write(tmp_path, "seeds: 3\nparams: {optim.lr: {grid: [0.1]}}"), ["seeds=5"])
    assert five.num_trials == 5


@pytest.mark.parametrize("text, match", [
    ("seeds: 0\nparams: {lr: {grid: [0.1]}}", "seeds must be >= 1"),
    ("seeds: 2\nparams: {run.seed: {grid: [0, 1]}}", "both set the seed"),
    ("baseline: {lr: 0.3}\nparams: {lr: {grid: [0.1, 0.2]}}",
     r"baseline lr=0.3 is not one of the grid's values \[0.1, 0.2\]"),
    ("baseline: {steps: 3}\nparams: {lr: {grid: [0.1, 0.2]}}",
     r"baseline names 'steps', which is not a grid parameter"),
])
def test_bad_seeds_and_baselines_are_refused(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_search_space(write(tmp_path, text))


def test_trial_labels_name_the_parameters():
    from pipelines.lib.sweep.search_space import trial_label, trial_run_name

    params = {"mask.strategy": "block_reversed", "mask.mask_ratio": 0.5, "run.seed": 1}
    assert trial_label(params) == "block_reversed-r0.5-s1"
    assert trial_label({"optim.lr": 0.00123456, "data.input.paths": "a/b"}) == "lr0.001235-pathsa_b"
    assert trial_run_name(params, "3f2a1_00004", unique=True) == "block_reversed-r0.5-s1"
    assert trial_run_name({"optim.lr": 0.001}, "3f2a1_00004", unique=False) == "lr0.001-00004"

"""What a sweep checks before its first trial (no Ray started, nothing written), and what --print-config shows."""

import ray
import yaml

from pipelines import sweep


def space_file(tmp_path, **changes):
    space = yaml.safe_load((sweep.ROOT / "tune_spaces" / "tab8_type.yaml").read_text())
    space.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def run_sweep(tmp_path, space, *overrides):
    return sweep.main(["--space", str(space), "--name", "checks", "--storage-path", str(tmp_path / "sweeps"),
                       "data.teacher_mode=cache", f"data.cache={tmp_path / 'no-cache'}", *overrides])


def test_a_misspelt_metric_is_refused_before_any_trial(tmp_path, capsys):
    code = run_sweep(tmp_path, space_file(tmp_path, metric="zeroshot_top"), "eval.input={paths: [x]}",
                     "eval.classifier_path=c.pt")
    err = capsys.readouterr().err
    assert code == 2
    assert "metric: 'zeroshot_top' is not reported by the trials; they report loss, grad_norm" in err
    assert "zeroshot_top1, zeroshot_top5" in err  # ... and it lists the real ones
    assert not ray.is_initialized() and not (tmp_path / "sweeps").exists()


def test_a_zero_shot_metric_without_an_eval_set_says_what_to_set(tmp_path, capsys):
    assert run_sweep(tmp_path, space_file(tmp_path)) == 2
    assert "zero-shot and retrieval metrics need eval.input / eval.retrieval_input" in capsys.readouterr().err


def test_print_config_shows_the_space_its_trials_and_the_fixed_settings(tmp_path, capsys):
    assert sweep.main(["--space", str(sweep.ROOT / "tune_spaces" / "tab8_ratio.yaml"), "--seeds", "2",
                       "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# 8 trials" in out and "4 arms x 2 seeds; differences against {'mask.mask_ratio': 0.0}" in out
    assert "# trials: r0-s0, r0-s1, r0.4-s0" in out
    assert "# fixed: mask.strategy=block_reversed, eval.every=0" in out
    config = yaml.safe_load(out)  # the rest is the trials' base config, with the fixed keys applied
    assert config["mask"]["strategy"] == "block_reversed" and config["eval"]["every"] == 0


def test_a_trial_that_cannot_get_a_cpu_for_its_reads_is_refused_on_a_ray_the_sweep_started(monkeypatch, caplog):
    import pytest

    from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig
    from pipelines.lib.sweep import tune as sweep_tune
    from uta_core.config import load_config

    cfg = load_config(PretrainConfig, DEFAULT_CONFIG, ["data.input.paths=[x]", "cluster.num_workers=1",
                                                       "cluster.cpus_per_worker=2"])
    monkeypatch.setattr(sweep_tune.ray, "cluster_resources", lambda: {"CPU": 3.0})  # 2 + 1 read + 0.01 > 3
    with pytest.raises(ValueError, match=r"one trial needs at least 3.01 CPUs .* this Ray has 3: lower "
                                         "cluster.cpus_per_worker"):
        sweep_tune.check_room(cfg, local=True)
    sweep_tune.check_room(cfg, local=False)  # a cluster may grow: a warning
    assert "trials wait until the cluster grows" in caplog.text
    monkeypatch.setattr(sweep_tune.ray, "cluster_resources", lambda: {"CPU": 4.0})
    sweep_tune.check_room(cfg, local=True)


def test_the_last_line_says_how_many_trials_failed(tmp_path):
    from pipelines.lib.sweep.results import SweepOutcome

    ok = SweepOutcome(csv=tmp_path / "results.csv", trials=4, failed=0, stopped=1)
    assert ok.last_line("s") == "sweep s: 4 trials, none failed (1 stopped early by the scheduler)"
    bad = SweepOutcome(csv=tmp_path / "results.csv", trials=4, failed=4, stopped=0)
    assert bad.succeeded == 0 and bad.last_line("s").startswith("sweep s: 4 of 4 trials FAILED")

"""The sweep's results table and plot (pure pandas / matplotlib, no Ray): every value with its step."""

from PIL import Image

from pipelines.lib.sweep.report import metric_vs_ratio, plot_metric_vs_ratio, results_table, trial_status


def trial(tid, strategy, ratio, values, total=None, error=False):
    history = [{"loss": v, "step": 2 * (i + 1)} for i, v in enumerate(values)]
    return {"trial_id": tid, "run_name": f"{strategy}-r{ratio}", "error": error, "total_steps": total,
            "config": {"mask.strategy": strategy, "mask.mask_ratio": ratio}, "history": history}


KEYS = ["mask.strategy", "mask.mask_ratio"]
TRIALS = [trial("a", "random", 0.4, [-0.2, -0.5, -0.4], total=6), trial("b", "block", 0.6, [-0.1, -0.3], total=6),
          trial("c", "random", 0.6, [-0.6, -0.7, -0.8], total=6),
          trial("d", "random", 0.4, [-0.3, -0.6, -0.2], total=6)]


def test_best_follows_the_mode_and_each_value_has_its_step():
    lower = results_table(TRIALS, KEYS, "loss", mode="min")
    assert list(lower["best_loss"]) == [-0.5, -0.3, -0.8, -0.6]
    assert list(lower["best_step"]) == [4, 4, 6, 4]
    assert list(lower["loss"]) == [-0.4, -0.3, -0.8, -0.2]  # the last value ...
    assert list(lower["step"]) == [6, 4, 6, 6]  # ... and the step it was taken at
    assert list(lower["evaluations"]) == [3, 2, 3, 3]
    assert list(lower["status"]) == ["DONE", "STOPPED", "DONE", "DONE"]  # b ended at step 4 of 6
    higher = results_table(TRIALS, KEYS, "loss", mode="max")
    assert list(higher["best_loss"]) == [-0.2, -0.1, -0.6, -0.2]


def test_stopped_trials_are_never_joined_with_finished_ones(tmp_path):
    table = results_table(TRIALS, KEYS, "loss", mode="min")
    data = metric_vs_ratio(table, "loss")
    # Only DONE trials make lines, each at one step; trials a and d share ratio 0.4: their mean.
    assert data["lines"] == {"random @ step 6": ([0.4, 0.6], [-0.30000000000000004, -0.8])}
    assert data["stopped"] == [("block", 0.6, -0.3, 4)]  # shown on its own, at its own step
    path = plot_metric_vs_ratio(table, "loss", tmp_path / "plot.png")
    assert Image.open(path).size == (768, 480)  # a real PNG of the figure's size (6.4 x 4 in at 120 dpi)


def test_trials_with_different_budgets_make_separate_lines():
    trials = [trial("a", "random", 0.4, [-0.1], total=2), trial("b", "random", 0.6, [-0.1, -0.2], total=4)]
    lines = metric_vs_ratio(results_table(trials, KEYS, "loss", mode="min"), "loss")["lines"]
    assert sorted(lines) == ["random @ step 2", "random @ step 4"]


def test_status_tells_a_stopped_trial_from_a_finished_one():
    assert trial_status(False, 2, 4) == "STOPPED"
    assert trial_status(False, 4, 4) == "DONE"
    assert trial_status(False, 2, None) == "DONE"  # no step budget reported: nothing to compare
    assert trial_status(True, 2, 4) == "ERROR"
    errored = results_table([trial("e", "random", 0.4, [], total=None, error=True)], KEYS, "loss")
    assert errored.loc[0, "status"] == "ERROR" and errored.loc[0, "step"] is None

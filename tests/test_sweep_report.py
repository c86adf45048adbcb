"""The sweep's results table and plot (pure pandas / matplotlib, no Ray)."""

from PIL import Image

from pipelines.lib.sweep.report import metric_vs_ratio, plot_metric_vs_ratio, results_table, trial_status


def trial(tid, strategy, ratio, values):
    history = [{"loss": v, "step": 2 * (i + 1)} for i, v in enumerate(values)]
    return {"trial_id": tid, "status": "DONE", "config": {"mask.strategy": strategy, "mask.mask_ratio": ratio},
            "last": history[-1], "history": history}


TRIALS = [trial("a", "random", 0.4, [-0.2, -0.5, -0.4]), trial("b", "block", 0.6, [-0.1, -0.3]),
          trial("c", "random", 0.6, [-0.6]), trial("d", "random", 0.4, [-0.3])]


def test_best_follows_the_mode():
    keys = ["mask.strategy", "mask.mask_ratio"]
    lower = results_table(TRIALS, keys, "loss", mode="min")
    assert list(lower["best_loss"]) == [-0.5, -0.3, -0.6, -0.3]
    assert list(lower["loss"]) == [-0.4, -0.3, -0.6, -0.3]  # the last report
    assert list(lower["evaluations"]) == [3, 2, 1, 1]
    higher = results_table(TRIALS, keys, "loss", mode="max")
    assert list(higher["best_loss"]) == [-0.2, -0.1, -0.6, -0.3]


def test_plot_has_one_line_per_strategy_through_the_mean_at_each_ratio(tmp_path):
    table = results_table(TRIALS, ["mask.strategy", "mask.mask_ratio"], "loss", mode="min")
    lines = metric_vs_ratio(table, "loss")
    assert sorted(lines) == ["block", "random"]
    assert lines["random"] == ([0.4, 0.6], [-0.35, -0.6])  # trials a and d share 0.4: their mean
    assert lines["block"] == ([0.6], [-0.3])
    path = plot_metric_vs_ratio(table, "loss", tmp_path / "plot.png")
    assert Image.open(path).size == (720, 480)  # a real PNG of the figure's size (6 x 4 in at 120 dpi)


def test_status_tells_a_stopped_trial_from_a_finished_one():
    assert trial_status(False, {"step": 2, "total_steps": 4}) == "STOPPED"
    assert trial_status(False, {"step": 4, "total_steps": 4}) == "DONE"
    assert trial_status(False, {"step": 2}) == "DONE"  # no step budget reported: nothing to compare
    assert trial_status(True, {"step": 2, "total_steps": 4}) == "ERROR"

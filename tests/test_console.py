"""What a job prints: one progress bar with rate and ETA, fed by rank 0, and our warnings.

A whole job's console (no Ray internals, the bar's last line, where its runs are) is checked where
users read it: ``ray job submit`` of the pre-training smoke test in ``test_cluster_configs.py``."""

import logging
import re
import time

import pytest

from pipelines.lib.progress import DriverProgress, WorkerProgress


@pytest.mark.ray
def test_rank0_progress_and_warnings_reach_the_driver(ray_local, capsys):
    @ray_local.remote(num_cpus=0)
    def rank0(name: str) -> bool:
        progress = WorkerProgress(name, active=True)
        progress.step(0, {})
        for step in range(1, 5):
            progress.step(step, {"loss": 1.0 / step, "images_per_s": 100.0} if step % 2 == 0 else None)
        logging.getLogger("uta.test").warning("the data shrank")
        time.sleep(1.0)  # the driver polls every 0.5 s
        return progress.board is not None

    with DriverProgress("pretrain test", 4) as progress:
        assert ray_local.get(rank0.remote(progress.name))
    err = capsys.readouterr().err
    assert "WARNING uta.test: the data shrank" in err
    assert re.search(r"pretrain test: 100%\|[^\n]*\| 4/4 [^\n]*loss 0\.2500, 100 img/s", err), err
    assert re.search(r"pretrain test: workers started in \d+ s", err), err


@pytest.mark.ray
@pytest.mark.parametrize("tty", [True, False])
def test_the_workers_start_is_a_stage_of_its_own_and_the_bar_keeps_one_clock(ray_local, capsys, tty):
    @ray_local.remote(num_cpus=0)
    def rank0(name: str) -> None:
        time.sleep(2.5)  # the workers starting (Ray Train's worker group, the model, the first reads)
        progress = WorkerProgress(name, active=True)
        for step in range(0, 5):
            progress.step(step, {"loss": 1.0})
        time.sleep(1.0)

    progress = DriverProgress("pretrain clock", 4)
    progress._tty = tty  # as in a terminal, where tqdm redraws one line
    with progress:
        ray_local.get(rank0.remote(progress.name))
    err = capsys.readouterr().err
    started = re.search(r"pretrain clock: workers started in (\d+) s", err)
    assert started and int(started.group(1)) >= 2, err
    assert err.index("starting the workers") < started.start() < err.index("4/4")
    final = re.findall(r"4/4 \[(\d\d):(\d\d)", err)[-1]  # the steps' own time, not the start's
    assert int(final[0]) * 60 + int(final[1]) < 2, err


def test_without_a_board_a_worker_reports_nothing_and_fails_nothing(ray_local):
    progress = WorkerProgress("no-such-board", active=True)
    assert progress.board is None
    progress.step(3, {"loss": 1.0})  # a sweep trial's rank 0: Tune reports instead

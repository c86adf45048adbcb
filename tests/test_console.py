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


NATIVE_SCRIPT = r"""
import os, sys, time
from pipelines.lib.native_stderr import drop_known_lines
drop_known_lines()
def native(b):  # as Ray's C++ core worker writes: straight to fd 2
    os.write(2, b)
native(b"[2026-12-07 14:11:40,511 E 9299 9299] core_worker.cc:2465: Actor with class name: 'MapWorker(x)' "
       b"and ID: '36' has constructor arguments in the object store and max_restarts > 0. If the ...\n")
native(b"[2026-12-07 14:11:41,000 E 9299 9299] core_worker.cc:99: a real error stays\n")
native(b"\rcaching:  50%|#####     | 3/6 [00:01<00:01]")  # a bar's redraw: no newline, passes at once
time.sleep(0.3)
print("python stderr stays", file=sys.stderr)
native(b"[2026-12-07 14:11:42,000 E 1 1] core_worker.cc:2465: Actor with class name: 'B' has constructor "
       b"arguments in the object store")  # split across two writes
native(b" and max_restarts > 0.\nafter\n")
"""


@pytest.mark.parametrize("raw", [False, True])
def test_the_known_native_ray_line_is_dropped_and_everything_else_passes(raw):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "UTA_NATIVE_STDERR"}
    if raw:
        env["UTA_NATIVE_STDERR"] = "raw"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", NATIVE_SCRIPT], cwd=root, env=env, capture_output=True,
                          timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "core_worker.cc:99: a real error stays\n" in err and "python stderr stays\n" in err
    assert "\rcaching:  50%" in err and err.endswith("after\n")
    assert err.count("has constructor arguments") == (2 if raw else 0)

"""What a job prints: our stages, one progress bar with rate and ETA, our warnings, and where its
MLflow runs are; not Ray's internals (those stay in the Ray session's log files)."""

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lib.progress import DriverProgress, WorkerProgress

REPO = Path(__file__).resolve().parents[1]
RAY_INTERNALS = ("TrainingReport(", "Execution plan", "core_worker.cc", "Progress bars disabled", "pid=",
                 "Checkpoint successfully created", "Deprecat", "exclude_resources", "Parsing model identifier")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_training_job_prints_our_lines_a_progress_bar_and_where_its_runs_are(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, "pipelines/pretrain.py", "--smoke-test", f"run.storage_path={tmp_path / 'runs'}",
         f"tracking.tracking_uri=sqlite:///{db}"],
        cwd=REPO, capture_output=True, text=True, timeout=380,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    for noise in RAY_INTERNALS:
        assert noise not in text, (noise, text[-4000:])
    # Without a terminal the bar is a line: step count, rate, ETA, last loss.
    assert re.search(r"pretrain smoke: 100%\|[^\n]*\| 6/6 \[[0-9:]+<00:00, [^\]]+\] loss -?[0-9.]+", text), text
    logs = re.search(r"Ray worker logs: (\S+)", text).group(1)
    assert any(Path(logs).glob("worker-*.out")), logs  # the workers' output went there instead
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in text
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning", text)
    assert len(text.splitlines()) < 40, text


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


def test_without_a_board_a_worker_reports_nothing_and_fails_nothing(ray_local):
    progress = WorkerProgress("no-such-board", active=True)
    assert progress.board is None
    progress.step(3, {"loss": 1.0})  # a sweep trial's rank 0: Tune reports instead

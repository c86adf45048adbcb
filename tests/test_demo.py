"""The README's main command, as users run it: the paper's claim in miniature.

The demo runs in its own process with its own local Ray (a session Ray with fewer CPUs would
starve its Ray Data reads). The test asserts the claim the demo prints (configs/demo.yaml
``expect``), with the figures measured on a 2-core CPU (see the README):
- teacher >= 50% zero-shot top-1 (chance 10%);
- UTA student >= 95% of the teacher;
- untrained control <= 25%.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_clip_benchmark, write_clip_benchmark_dataset

REPO = Path(__file__).resolve().parents[1]
TEACHER_MIN = 0.50  # measured 0.981
STUDENT_FRACTION = 0.95  # the demo's claim (expect.min_ratio); measured 0.991 (student 97.2%)
CONTROL_MAX = 0.25  # measured 0.148


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_demo_student_matches_teacher_without_captions(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "demo.py"), f"out={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (results_path,) = tmp_path.glob("runs/*/results.json")
    results = json.loads(results_path.read_text())
    top1 = results["zeroshot_top1"]
    assert top1["teacher"] >= TEACHER_MIN, top1
    assert top1["student"] >= STUDENT_FRACTION * top1["teacher"], top1
    assert top1["control"] <= CONTROL_MAX, top1
    assert "claim (student >= 95% of teacher, control <= 25%): holds" in proc.stdout
    assert results["heldout_images"] == 359
    # what the demo promises to leave behind
    work = results_path.parent
    assert (work / "loss_curves.png").stat().st_size > 0
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert (tmp_path / "mlflow.db").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(results["mlflow"]["demo_run_id"])
    assert run.data.metrics["zeroshot_top1_student"] == pytest.approx(top1["student"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"loss_curves.png", "results.json",
                                                                        "retrieval.json"}
    # Retrieval on the held-out captions: the student retrieves like its teacher, the control does not.
    recall = results["retrieval"]
    assert recall["student"]["retrieval_i2t_r1"] >= STUDENT_FRACTION * recall["teacher"]["retrieval_i2t_r1"], recall
    assert recall["control"]["retrieval_i2t_r1"] <= CONTROL_MAX, recall
    assert "i2t R@1" in proc.stdout and "?workflowType=machine_learning" in proc.stdout
    # The student's export is an open_clip CLIP: clip_benchmark's CLI scores it as the demo did.
    from uta_core.data.digits import CLASS_NAMES, TEMPLATES
    from uta_core.data.shards import InputConfig
    from uta_core.data.storage import S3Options
    from uta_core.eval.data import load_eval_set

    heldout = InputConfig(paths=[str(work / "digits" / "heldout")])
    pixels, labels = load_eval_set(heldout, S3Options(), pixels_size(work), 100_000)
    root = write_clip_benchmark_dataset(tmp_path / "clip_benchmark", pixels, labels, CLASS_NAMES, TEMPLATES)
    metrics = run_clip_benchmark(Path(results["files"]["student export"]), root, tmp_path / "cb.json")
    assert metrics["acc1"] == pytest.approx(top1["student"], abs=1e-6)


def pixels_size(work: Path) -> int:
    return json.loads((work / "demo-student" / "export" / "uta_student.json").read_text())["student"]["img_size"]

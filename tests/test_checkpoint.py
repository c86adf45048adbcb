"""Checkpoints written by GPU workers load on a driver without a GPU, through the code paths
the jobs use (resume, evaluation, export), and a run resumes from the newest complete one."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from uta_core.checkpoint import DamagedCheckpoint, Position, load_state, save_state, training_state
from uta_core.data.storage import S3Options
from uta_core.models.student import build_student
from uta_core.models.trained import load_trained_student
from uta_core.optim import OptimConfig, build_optimizer, build_scheduler
from uta_core.run.folder import RunFolder, checkpoint_dir_name


@contextlib.contextmanager
def saved_as_if_on_cuda():
    """torch.save records each storage's device; make it record ``cuda:0`` (what a GPU worker
    writes), so loading needs ``map_location`` on a machine without CUDA."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def a_state(step: int) -> dict:
    student = build_student("nano", img_size=32, patch_size=4, out_dim=32)
    opt = build_optimizer(student, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, OptimConfig(lr=1e-3), warmup_steps=1, total_steps=10)
    config = {"student": {"variant": "nano", "img_size": 32, "patch_size": 4, "out_dim": 32}}
    meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "teacher": None}
    return training_state(student, opt, sched, Position(step=step), config, {}, meta)


def write_checkpoint(run: Path, step: int, on_cuda: bool = True) -> Path:
    folder = run / checkpoint_dir_name(step)
    with saved_as_if_on_cuda() if on_cuda else contextlib.nullcontext():
        save_state(a_state(step), folder, step)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_saved_on_cuda_loads_on_a_cpu_only_driver(tmp_path):
    folder = write_checkpoint(tmp_path / "run", 4)
    with pytest.raises(RuntimeError, match="CUDA"):  # the simulation is real: a plain load fails here
        torch.load(folder / "state.pt", weights_only=True)
    state = load_state(folder)  # resume
    assert all(t.device.type == "cpu" for t in state["model"].values()) and state["position"]["step"] == 4
    student, mean, std, info = load_trained_student(str(folder), S3Options())  # evaluate.py, stage 2
    assert next(student.parameters()).device.type == "cpu" and info["step"] == 4
    assert RunFolder(str(tmp_path / "run"), S3Options()).load_checkpoint(4)["position"]["step"] == 4


def test_the_newest_complete_checkpoint_is_found_and_an_incomplete_or_truncated_one_is_skipped(tmp_path, caplog):
    run = tmp_path / "run"
    for step in (2, 4):
        write_checkpoint(run, step, on_cuda=False)
    (run / checkpoint_dir_name(6)).mkdir()  # a folder whose files never arrived
    (run / checkpoint_dir_name(8)).mkdir()
    (run / checkpoint_dir_name(8) / "state.pt").write_bytes((run / checkpoint_dir_name(4) / "state.pt").read_bytes())
    folder = RunFolder(str(run), S3Options())
    assert folder.checkpoint_steps() == [8, 6, 4, 2]
    assert folder.newest_checkpoint()[0] == 4  # 8: a whole state.pt, but no record written after it
    assert "checkpoint_0000008 is incomplete: it has no checkpoint.json" in caplog.text
    path = run / checkpoint_dir_name(4) / "state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an upload killed half-way
    with pytest.raises(DamagedCheckpoint, match="state.pt holds [0-9,]+ bytes, its checkpoint.json records"):
        folder.load_checkpoint(4)
    step, state = folder.newest_checkpoint()
    assert step == 2 and state["position"]["step"] == 2
    assert RunFolder(str(tmp_path / "no-such-run"), S3Options()).newest_checkpoint() is None

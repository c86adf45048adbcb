"""Checkpoints written by GPU workers load on a driver without a GPU, through the code paths
the jobs use (resume, evaluation, export), and a run resumes from the newest complete one."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from uta_core.checkpoint import (
    Position,
    checkpoint_dir_name,
    load_state,
    load_stored_state,
    stored_checkpoint_steps,
    training_state,
)
from uta_core.data.storage import S3Options
from uta_core.models.student import build_student
from uta_core.models.trained import load_trained_student
from uta_core.optim import OptimConfig, build_optimizer, build_scheduler


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
    folder.mkdir(parents=True)
    with saved_as_if_on_cuda() if on_cuda else contextlib.nullcontext():
        torch.save(a_state(step), folder / "state.pt")
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_saved_on_cuda_loads_on_a_cpu_only_driver(tmp_path):
    folder = write_checkpoint(tmp_path / "run", 4)
    with pytest.raises(RuntimeError, match="CUDA"):  # the simulation is real: a plain load fails here
        torch.load(folder / "state.pt", weights_only=False)
    state = load_state(folder)  # resume
    assert all(t.device.type == "cpu" for t in state["model"].values()) and state["position"]["step"] == 4
    student, mean, std, info = load_trained_student(str(folder), S3Options())  # evaluate.py, stage 2
    assert next(student.parameters()).device.type == "cpu" and info["step"] == 4
    assert load_stored_state(str(tmp_path / "run"), 4, S3Options())["position"]["step"] == 4


def test_the_newest_complete_checkpoint_is_found_and_a_truncated_one_is_skipped(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        write_checkpoint(run, step, on_cuda=False)
    (run / checkpoint_dir_name(6)).mkdir()  # a folder whose state never arrived
    assert stored_checkpoint_steps(str(run), S3Options()) == [4, 2]
    path = run / checkpoint_dir_name(4) / "state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an upload killed half-way
    assert load_stored_state(str(run), 4, S3Options()) is None
    assert load_stored_state(str(run), 2, S3Options())["position"]["step"] == 2
    assert stored_checkpoint_steps(str(tmp_path / "no-such-run"), S3Options()) == []

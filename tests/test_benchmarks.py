"""Tiny CPU runs of the GPU benchmarks, so they cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_student_step_benchmark_runs_tiny_on_cpu_and_prints_its_table(capsys):
    bench = _load("student_step")
    argv = ["--device", "cpu", "--variants", "nano", "--img-size", "32", "--patch-size", "4", "--out-dim", "32",
            "--batch", "4", "--steps", "2", "--warmup", "1", "--peak-tflops", "1.0"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split() for line in lines if line.strip().startswith("nano")}
    assert set(rows) == {"uta", "fd"}
    uta_tflops, fd_tflops = float(rows["uta"][4]), float(rows["fd"][4])
    assert uta_tflops > 0 and fd_tflops > 0 and rows["uta"][5].endswith("%")

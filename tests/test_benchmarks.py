"""Tiny CPU runs of the GPU benchmarks, so they cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


def test_fence_cost_benchmark_runs_tiny_and_prints_both_stores(capsys, aws_test_env):
    assert _load("fence_cost").main(["--checks", "3"]) == 0
    out = capsys.readouterr().out
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()[1:3]}
    assert set(rows) == {"local disk", "S3 (moto, loopback)"} and all(float(v[0]) > 0 for v in rows.values())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cache_throughput_benchmark_runs_tiny_and_prints_every_codec(ray_local, capsys):
    bench = _load("cache_throughput")
    argv = ["--geometry", "tiny", "--images", "12", "--shards", "2", "--images-per-block", "4", "--num-cpus", "2",
            "--rank", "8", "--basis-views", "16"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| codec")}
    assert set(rows) == {"float16", "int8", "lowrank_int8"}
    assert "65 x 32 tokens per view" in out and "load average" in out
    for codec, token_kb, ratio in (("float16", 4.2, 1.0), ("int8", 2.1, 2.0), ("lowrank_int8", 0.7, 5.9)):
        views_per_s, driver_ms, _, kb, fp16_ratio, cos_cls, cos_patch, loader, unverified, cost, restore = rows[codec]
        assert float(views_per_s) > 0 and float(driver_ms) > 0 and float(loader) > 0 and float(restore) > 0
        assert float(unverified) > 0 and cost.endswith("%")
        assert float(kb) == token_kb and float(fp16_ratio.rstrip("x")) == ratio
        assert float(cos_cls) > 0.999 and float(cos_patch.split("/")[0]) > (0.999 if codec != "lowrank_int8" else 0.5)


def test_masking_benchmark_runs_tiny_and_prints_every_strategy_against_beits_loop(capsys):
    bench = _load("masking")
    assert bench.main(["--grids", "8", "--batches", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    header, _, row = [line for line in out.splitlines() if line.startswith("|")]
    assert header.split("|")[3:7] == [" random ", " block ", " block_reversed ", " gaussian "]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:2] == ["8x8", "4"] and cells[7].endswith("x faster") and "load average" in out
    assert all(float(c.split()[0]) > 0 for c in cells[2:7])


@pytest.mark.timeout(300)
def test_gpu_smoke_runs_tiny_on_cpu_and_every_check_passes(capsys):
    """The GPU node check at toy sizes: the same code paths as on a GPU (no Ray), so it cannot rot."""
    bench = _load("gpu_smoke")
    assert bench.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for title in ("1. environment", "2. student step", "3. teacher", "4. checkpoint", "5. DDP"):
        assert f"\n{title}" in out, title
    steps = [line for line in out.splitlines() if line.startswith(("| uta ", "| fd ", "| mim "))]
    assert len(steps) == 6 and not any("FAIL" in line for line in steps)  # 3 objectives x grad ckpt off / on
    assert "| 2 | gloo | ok |" in out and "0 failed check(s)" in out

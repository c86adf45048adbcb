"""``./uta``: with no command it lists what it runs (commands, every pipeline, every benchmark, each with
its purpose); ``./uta bench`` lists the benchmarks; a name that is not one is one line; ``--help`` after a
benchmark's name reaches the benchmark."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def uta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "uta"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args", [(), ("help",)])
def test_uta_alone_lists_its_commands_every_pipeline_and_every_benchmark(args):
    proc = uta(*args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: ./uta COMMAND") and "set -euo" not in out
    for script in [*(ROOT / "pipelines").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if script.stem != "__init__":
            assert script.stem in out, script
    flat = " ".join(out.split())  # purposes wrap to the terminal; an abbreviation does not end one
    assert "The paper's Tab. 6 in miniature: UTA vs FD vs MIM vs UTA+MIM on the demo's digits." in flat
    assert "(the UTA paper's Fig. 3) and generation speed." in flat


def test_uta_bench_lists_the_benchmarks_and_refuses_a_name_that_is_not_one():
    listing = uta("bench")
    assert listing.returncode == 0 and "benchmarks:" in listing.stdout and "teacher_modes" in listing.stdout
    assert "unbound variable" not in listing.stderr
    assert uta("bench", "--help").stdout == listing.stdout
    wrong = uta("bench", "nope")
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "error: no benchmark 'nope' (benchmarks/nope.py); ./uta bench lists them")


def test_help_after_a_benchmarks_name_reaches_the_benchmark():
    proc = uta("bench", "masking", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: masking.py"), proc.stderr

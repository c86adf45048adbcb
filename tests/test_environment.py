"""Two checkouts on one machine share the cached environment, and each runs its own code:
the environment holds the dependencies only, and ``./uta`` puts its own checkout first on the
path of every process it starts (the driver, a local Ray, Ray's workers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WHERE_IS_THE_CODE = """
import ray, uta_core
from pipelines.lib.ray_setup import start_local_ray
start_local_ray(num_cpus=1)
worker = ray.get(ray.remote(lambda: __import__("uta_core").__file__).remote())
print("driver", uta_core.__file__)
print("worker", worker)
ray.shutdown()
"""


def second_checkout(folder: Path) -> Path:
    for name in ("uta_core", "pipelines", "scripts"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("uta", "pyproject.toml"):
        shutil.copy2(ROOT / name, folder / name)
    return folder


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_second_checkout_runs_its_own_code_in_its_driver_and_its_ray_workers(tmp_path):
    other = second_checkout(tmp_path / "other")
    site = Path(sys.prefix)
    before = sorted(p.name for p in site.glob("lib/python*/site-packages/*"))
    proc = subprocess.run([str(other / "uta"), "python", "-c", WHERE_IS_THE_CODE], cwd="/", text=True,
                          capture_output=True, timeout=200, env={**os.environ, "UTA_VENV": sys.prefix})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("driver", "worker")))
    assert found["driver"].startswith(str(other)) and found["worker"].startswith(str(other)), found
    # This checkout is untouched: nothing was installed into, or re-pointed in, the environment.
    import uta_core

    assert Path(uta_core.__file__).is_relative_to(ROOT)
    assert sorted(p.name for p in site.glob("lib/python*/site-packages/*")) == before


def test_the_environment_holds_no_copy_of_the_project():
    """Without the checkout on the path, the project is not importable: no editable finder, no
    installed copy that could shadow a checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import importlib.util as u; print(u.find_spec('uta_core'), u.find_spec('pipelines'))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "None"], proc.stdout + proc.stderr

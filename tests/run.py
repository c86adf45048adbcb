"""How ``./uta test`` runs the suite: two pytest processes side by side, one per lane.

- The ray lane: the tests that start Ray (marked ``ray`` or on the session's ``ray_local``), in the
  order ``conftest.py`` gives. Its output streams to the console as it runs.
- The cpu lane: every other test, at idle priority (``SCHED_IDLE``) with one torch thread: it takes
  the cores only while the ray lane leaves them idle. Its output is kept and printed after the ray
  lane's, so each lane's report reads whole.

Run one after the other, the Ray tests left 28% of two cores idle (starting processes, waiting on
Ray, on jobs and on faults) and the Ray-free ones 47% (one thread). Ray runs its workers at nice 15
(``RAY_worker_niceness``), so the cpu lane at normal priority took their cores instead of their idle
time: the demo ran 352 s instead of ~200 s beside it.

Arguments pass to both lanes. A run that names test files or node ids, or asks for what one process
must do (``--pdb``, ``--collect-only``, ``--lane``, ...), is one plain pytest process. The exit
status is pytest's: 0 when both lanes pass, also beside a lane that selected nothing (5). pytest's
record of failed tests (``--lf``) is both lanes' together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_PROCESS = {"--pdb", "--trace", "--collect-only", "--co", "-h", "--help", "--version", "--fixtures",
               "--markers", "--lane", "--lf", "--last-failed", "--ff", "--failed-first", "--sw", "--stepwise"}
NO_TESTS = 5
LASTFAILED = Path("v/cache/lastfailed")  # in pytest's cache folder


def one_process(args: list[str]) -> bool:
    names_tests = any(not a.startswith("-") and Path(a.split("::")[0]).exists() for a in args)
    return names_tests or any(a.split("=")[0] in ONE_PROCESS for a in args)


def exit_status(codes: list[int]) -> int:
    ran = [code for code in codes if code != NO_TESTS]
    return max(ran) if ran else NO_TESTS


def merged_failures(before: dict, ray: dict, cpu: dict) -> dict:
    """Each lane's record keeps the other lane's entries as they were ``before``: an entry is
    current when both records hold it (neither lane ran it, or it failed again) or when it is new."""
    return {k: v for k, v in {**ray, **cpu}.items() if (k in ray and k in cpu) or k not in before}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def idle_priority() -> None:
    """In the cpu lane's process before it starts pytest (and so in every process it starts)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed here: the lowest priority a process may take
        os.nice(19)


def wait(lanes: dict[str, subprocess.Popen], start: float) -> dict[str, float]:
    """Seconds from ``start`` to each lane's end (Ctrl-C reaches both lanes; this waits them out)."""
    ended = {}
    while len(ended) < len(lanes):
        try:
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        now = time.monotonic() - start
        ended |= {name: now for name, p in lanes.items() if name not in ended and p.poll() is not None}
    return ended


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    if one_process(args):
        os.execv(sys.executable, pytest + args)
    cache, start = Path(".pytest_cache"), time.monotonic()
    before = read_json(cache / LASTFAILED)
    with tempfile.TemporaryFile("w+") as cpu_out, tempfile.TemporaryDirectory() as cpu_cache:
        if cache.is_dir():  # the cpu lane starts from the same record, in a copy of its own
            shutil.copytree(cache, cpu_cache, dirs_exist_ok=True)
        lanes = {
            "ray": subprocess.Popen([*pytest, "--lane=ray", *args]),
            "cpu": subprocess.Popen([*pytest, "--lane=cpu", "-o", f"cache_dir={cpu_cache}", *args], stdout=cpu_out,
                                    stderr=subprocess.STDOUT, env={"OMP_NUM_THREADS": "1", **os.environ},
                                    preexec_fn=idle_priority),
        }
        seconds = wait(lanes, start)
        failures = merged_failures(before, read_json(cache / LASTFAILED), read_json(Path(cpu_cache) / LASTFAILED))
        cpu_out.seek(0)
        print(f"\n{'=' * 24} the cpu lane: the tests that start no Ray, run beside the ray lane {'=' * 24}")
        sys.stdout.write(cpu_out.read())
    if (cache / LASTFAILED).parent.is_dir():
        (cache / LASTFAILED).write_text(json.dumps(failures, indent=2, sort_keys=True))
    codes = {name: p.returncode for name, p in lanes.items()}
    print(" | ".join(f"{name} lane: exit {codes[name]} after {seconds[name]:.0f} s" for name in lanes), flush=True)
    return exit_status(list(codes.values()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

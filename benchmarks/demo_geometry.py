"""The demo's two training steps at its image size and at the size it had before, side by side, with
each step's top entries in torch.profiler (self CPU time): where a demo step's time goes.

    ./uta bench demo_geometry                   # 16 px (configs/demo.yaml) vs 32 px, patch 4 both
    ./uta bench demo_geometry --sizes 16 32 24 --steps 8

The steps are the jobs' own (``train_step`` on one prepared 128-image batch, no data path), in this
process, random-init weights: the teacher stage (the 4-layer width-128 CLIP with its text tower) and
the student stage (a nano student from a 2-view cache, mask 0.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from pretrain_step import DEMO_SIZE, job_and_plan, step_seconds, workspace  # noqa: E402

from pipelines.lib.train.launch import run_folder  # noqa: E402
from pipelines.lib.train.runtime import LocalRuntime  # noqa: E402


def measure(size: int, folder: Path, steps: int, threads: int, top: int) -> list[tuple]:
    ws = workspace(folder / str(size), size)
    rows = []
    for name in ("teacher", "student"):
        job, plan = job_and_plan(name, ws, steps, threads)
        runtime = LocalRuntime(run_folder(job.cfg), 1, threads=threads)
        seconds = statistics.median(step_seconds(job, plan, runtime, steps))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step_seconds(job, plan, runtime, 4)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        rows.append((name, size, (size // 4) ** 2 + 1, seconds,
                     [(e.key, e.self_cpu_time_total / total) for e in ops[:top]]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[DEMO_SIZE, 32])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage and size (after 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=5, help="profile entries shown per stage and size")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="uta-bench-geometry-") as folder:
        rows = [r for size in args.sizes for r in measure(size, Path(folder), args.steps + 2, args.threads, args.top)]
    print(f"\nthe demo's steps, 128 images, torch threads {args.threads}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  {'stage':<8} {'size':>5} {'tokens':>7} {'s/step':>7} {'vs first size':>14}")
    first = {name: seconds for name, size, _, seconds, _ in rows if size == args.sizes[0]}
    for name, size, tokens, seconds, _ in rows:
        print(f"  {name:<8} {size:>4}px {tokens:>7} {seconds:7.3f} {seconds / first[name]:13.2f}x")
    for name, size, _, _, ops in rows:
        print(f"\n  {name} at {size} px, top {len(ops)} by self CPU time:")
        for key, share in ops:
            print(f"    {share:6.1%}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

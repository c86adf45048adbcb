"""Wall time of one small masking sweep: every trial from one teacher cache vs an online teacher.

    ./uta bench sweep_cache_vs_online                     # 4 trials x 20 steps, tiny student
    ./uta bench sweep_cache_vs_online --steps 40 --teacher-layers 12

The same sweep (tune_spaces/smoke.yaml's 2 strategies x 2 mask ratios, FIFO, one trial at a
time, same seeds and steps) runs twice in one process on a fresh local Ray each time:
- ``cache``: the teacher's tokens are computed once by pipelines/cache_teacher.py (timed
  separately), then every trial reads them and never builds a teacher;
- ``online``: every trial builds the teacher and runs its forward on every batch.
The teacher is a random-init open_clip ViT (timing only), sized against the student roughly
as in the paper: its forward costs 2.6x the student's forward+backward at mask 0.5 here,
EVA-02-CLIP-L's costs ~2.3x a ViT-B/16 student's at 224 px (analytic FLOPs).
The table gives the ratios cache / online with and without the one-off cache build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import cache_teacher, sweep
from uta_core.data.digits import write_digits_splits
from uta_core.models.flops import ViTShape, step_flops, student_shape


def teacher_arch(args) -> dict:
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"image_size": args.img_size, "patch_size": args.patch_size, "width": args.teacher_width,
                       "layers": args.teacher_layers, "head_width": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }


def common_overrides(args, workdir: Path, arch: Path) -> list[str]:
    return [
        f"data.views.size={args.img_size}", "data.views.scale=[0.85, 1.0]", "data.views.hflip=false",
        f"student.variant={args.student}", f"student.img_size={args.img_size}",
        f"student.patch_size={args.patch_size}", f"student.out_dim={args.embed_dim}",
        f"teacher.arch={arch}", "teacher.pretrained=null", "teacher_random_seed=0", "teacher.precision=fp32",
        f"train.micro_batch={args.batch}", f"train.max_steps={args.steps}", "train.warmup_steps=2",
        "train.precision=fp32", "eval.input=null", f"run.log_every={max(1, args.steps // 4)}",
        f"run.checkpoint_every={args.steps}", "run.export=false",
        "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.data_cpus=1",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def run_sweep(args, workdir: Path, name: str, overrides: list[str]) -> float:
    sweep_args = sweep.parse_args(["--space", str(workdir / "space.yaml"), "--name", name,
                                   "--storage-path", str(workdir / "sweeps"), "--max-concurrent", "1"])
    start = time.perf_counter()
    sweep.run(sweep_args, overrides)
    return time.perf_counter() - start


def trial_times(workdir: Path, name: str) -> tuple[float, float]:
    """Mean over the sweep's trials of Tune's time_total_s and of the last reported step time."""
    totals, steps = [], []
    for path in (workdir / "sweeps" / name).glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        totals.append(rows[-1]["time_total_s"])
        steps.append(rows[-1]["step_time_s"])
    return statistics.mean(totals), statistics.mean(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per trial")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=400, help="digits used (80%% train)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--teacher-width", type=int, default=384)
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--embed-dim", type=int, default=256)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="uta-bench-sweep-"))
    write_digits_splits(workdir / "digits", size=args.img_size, limit=args.images)
    arch = workdir / "bench-teacher.json"
    arch.write_text(json.dumps(teacher_arch(args)))
    space = (sweep.ROOT / "tune_spaces" / "smoke.yaml").read_text().replace("type: asha", "type: fifo")
    (workdir / "space.yaml").write_text(space)  # FIFO: both modes run every trial to the end
    base = common_overrides(args, workdir, arch)
    train = workdir / "digits" / "train"

    start = time.perf_counter()
    code = cache_teacher.main([
        f"input.paths={train}", f"output.path={workdir / 'cache'}", f"views.size={args.img_size}",
        "views.scale=[0.85, 1.0]", "views.hflip=false", "num_views=1", f"teacher.arch={arch}",
        "teacher.pretrained=null", "teacher.precision=fp32", "teacher_random_seed=0", "ray.batch_size=64",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ])
    build_s = time.perf_counter() - start
    if code != 0:
        raise SystemExit("building the teacher cache failed")
    cache_s = run_sweep(args, workdir, "from-cache",
                        base + ["data.teacher_mode=cache", f"data.cache={workdir / 'cache'}"])
    online_s = run_sweep(args, workdir, "online", base + ["data.teacher_mode=online", f"data.input.paths={train}"])

    tcfg = teacher_arch(args)["vision_cfg"]
    teacher = ViTShape(embed_dim=args.teacher_width, depth=args.teacher_layers, mlp_hidden=4 * args.teacher_width,
                       mlp_matrices=2, patch_size=args.patch_size,
                       num_patches=(tcfg["image_size"] // args.patch_size) ** 2, out_dim=args.embed_dim)
    student = student_shape(args.student, img_size=args.img_size, patch_size=args.patch_size, out_dim=args.embed_dim)
    flops = step_flops("uta", student, 0.5, teacher)
    print(f"\nSweep: 4 trials (random, block_reversed x mask 0.4, 0.6), {args.steps} steps x batch {args.batch}, "
          f"{args.student} student, teacher ViT width {args.teacher_width} x {args.teacher_layers} layers, "
          f"{args.img_size} px / patch {args.patch_size}, one trial at a time")
    print(f"analytic FLOPs per step at mask 0.5: teacher forward / student fwd+bwd = "
          f"{flops.teacher_forward / flops.student_step:.2f}; cache / online = {flops.student_step / flops.total:.2f}")
    (cache_trial, cache_step), (online_trial, online_step) = trial_times(workdir, "from-cache"), trial_times(
        workdir, "online")
    rows = [
        ("online teacher (every trial)", f"{online_s:.1f}", "-"),
        ("from cache: sweep only", f"{cache_s:.1f}", f"{cache_s / online_s:.2f}"),
        ("from cache: cache build + sweep", f"{build_s + cache_s:.1f}", f"{(build_s + cache_s) / online_s:.2f}"),
        ("  of which the cache build", f"{build_s:.1f}", "-"),
        ("per trial, online (Tune time_total_s)", f"{online_trial:.1f}", "-"),
        ("per trial, from cache", f"{cache_trial:.1f}", f"{cache_trial / online_trial:.2f}"),
        ("training step, online", f"{online_step:.3f}", "-"),
        ("training step, from cache", f"{cache_step:.3f}", f"{cache_step / online_step:.2f}"),
    ]
    print(f"| {'wall time of':<38} | {'s':>7} | {'/ online':>8} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 10}|")
    for name, seconds, ratio in rows:
        print(f"| {name:<38} | {seconds:>7} | {ratio:>8} |")
    print("Per trial, a fixed cost (Ray Train worker start, datasets, checkpoint, MLflow) adds to the steps; "
          "the longer the trials, the closer the sweep ratio gets to the step ratio.")
    print(f"(work folder: {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

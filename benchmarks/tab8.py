"""The paper's Tab. 8 in miniature: mask ratio and masking type as Ray Tune sweeps with seeds, from one cache.

    ./uta bench tab8                               # both halves, 3 seeds each, 60 student steps
    ./uta bench tab8 --half type --seeds 5 --steps 120
    ./uta bench tab8 --half objectives              # Tab. 6: uta, fd, uta_mim (tune_spaces/tab6_objectives.yaml)

The miniature: scikit-learn's digits at 32 px with patch 4, an 8 x 8 token grid (blocks of at least 16
patches are blocks, not the whole image); the demo's teacher (a small CLIP trained on the digits' captions,
at 32 px) and its token cache, built once in ``<out>/teacher`` and reused by every later run; a nano
student trained ``--steps`` steps from that cache, a budget that leaves it below the teacher, so a masking
choice can still show. Each half is one sweep (``pipelines/sweep.py`` with ``tune_spaces/tab8_ratio.yaml``
or ``tab8_type.yaml``): every arm runs the same seeds, no early stopping, zero-shot top-1 on the 360
held-out digits at the last step; its report (``summary.md``: mean, 95% t interval, paired difference
against the baseline arm) is printed and logged to the sweep's MLflow run. A rerun with the same
``--seeds`` and ``--steps`` resumes its sweeps (finished trials are kept).

Paper (ViT-B/16, ImageNet-21K, ImageNet zero-shot top-1): ratio 0.0 / 0.4 / 0.5 / 0.7 = 74.7 / 75.0 / 74.8 /
74.0 (block_reversed); at ratio 0.5 block / random / block_reversed = 74.2 / 74.7 / 74.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import yaml  # noqa: E402

from pipelines import sweep  # noqa: E402
from pipelines.demo import cache_config, student_config, teacher_config, teacher_files, write_classifier  # noqa: E402
from pipelines.lib.cache import job as cache_job  # noqa: E402
from pipelines.lib.contrastive import job as contrastive_job  # noqa: E402
from pipelines.lib.demo.config import DEFAULT_CONFIG, Paths, load_demo_config  # noqa: E402
from pipelines.lib.ray_setup import cluster_resources, init_ray  # noqa: E402
from uta_core.config import to_dict  # noqa: E402
from uta_core.data.digits import write_digits_splits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HALVES = {"ratio": "tab8_ratio.yaml", "type": "tab8_type.yaml", "objectives": "tab6_objectives.yaml"}
PAPER = {"ratio": {"r0": 74.7, "r0.4": 75.0, "r0.5": 74.8, "r0.7": 74.0},
         "type": {"block": 74.2, "random": 74.7, "block_reversed": 74.8},
         "objectives": {"uta": 75.0, "fd": 74.7, "uta_mim": 70.7}}
RAY_CPUS = 4  # logical: a trial's 2 worker CPUs (torch threads on the 2 cores), 1 read task, Tune's own sliver
MINIATURE = ["digits.size=32", "teacher.train.max_steps=200"]  # 8x8 grid; the teacher at 32 px needs more steps


def build_teacher(out: Path, student: list[str]) -> Path:
    """Digits, the teacher, its classifier and its token cache in ``out/teacher`` (once); returns the
    sweep's base config (the demo's student wiring, as YAML)."""
    cfg = load_demo_config(DEFAULT_CONFIG, [f"out={out}", *MINIATURE, *student])
    work = out / "teacher"
    paths = Paths(work=work, tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    worker_cpus = max(1, int(cluster_resources()[0]) - 2)  # a read task's CPU and the trial's own beside it
    tcfg = teacher_config(cfg, paths, worker_cpus)
    arch, weights = teacher_files(tcfg, paths)
    ready = work / "ready.json"
    if not ready.exists():
        start = time.perf_counter()
        d = cfg.digits
        write_digits_splits(paths.digits, size=d.size, heldout_fraction=d.heldout_fraction,
                            samples_per_shard=d.samples_per_shard, seed=d.seed, limit=d.limit)
        teacher_top1 = contrastive_job.run(tcfg)["metrics"].get("zeroshot_top1", float("nan"))
        write_classifier(cfg, paths, arch, weights)
        report = cache_job.run(cache_config(cfg, paths, arch, weights))
        if report["incomplete"]:
            raise RuntimeError(f"the cache left shards incomplete: {', '.join(report['incomplete'])}")
        ready.write_text(json.dumps({"teacher_zeroshot_top1": teacher_top1,
                                     "seconds": round(time.perf_counter() - start, 1)}))
    scfg = student_config(cfg, paths, worker_cpus, arch, weights)
    base = to_dict(scfg)
    base["eval"]["retrieval_input"] = None  # the sweep's metric is zero-shot top-1
    path = out / "student_base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--half", choices=[*HALVES, "both"], default="both",
                        help="ratio, type (Tab. 8's halves), objectives (Tab. 6), or both halves of Tab. 8")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="student steps per trial (default: %(default)s)")
    parser.add_argument("--out", default="outputs/bench_tab8")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = [f"student.train.max_steps={args.steps}", "student.train.warmup_steps=10"]
    start = time.perf_counter()
    started = init_ray(None, RAY_CPUS)
    try:
        base = build_teacher(out, student)
        teacher = json.loads((out / "teacher" / "ready.json").read_text())
        codes = {}
        for half in ["ratio", "type"] if args.half == "both" else [args.half]:
            print(f"\n[tab8] {half}: {HALVES[half]}, {args.seeds} seeds, {args.steps} steps", flush=True)
            codes[half] = sweep.main(["--config", str(base), "--space", str(ROOT / "tune_spaces" / HALVES[half]),
                                      "--name", f"tab8-{half}-{args.seeds}seeds-{args.steps}steps",
                                      "--storage-path", str(out / "sweeps"), "--seeds", str(args.seeds),
                                      "--max-concurrent", "1"])
    finally:
        if started:
            ray.shutdown()
    for half in codes:
        summary = out / "sweeps" / f"tab8-{half}-{args.seeds}seeds-{args.steps}steps" / "summary.md"
        table = "Tab. 6" if half == "objectives" else f"Tab. 8 ({half})"
        print(f"\n{table} in miniature; paper (ImageNet ZS): {PAPER[half]}\n")
        print(summary.read_text() if summary.exists() else f"(no summary: the sweep exited {codes[half]})")
    print(f"teacher zero-shot top-1 {teacher['teacher_zeroshot_top1']:.1%} (chance 10%); all in "
          f"{time.perf_counter() - start:.0f} s; MLflow: sqlite:///{out / 'mlflow.db'}")
    return max(codes.values(), default=1)


if __name__ == "__main__":
    sys.exit(main())

"""The paper's Tab. 6 in miniature: UTA vs FD vs MIM vs UTA+MIM on the demo's digits.

    ./uta bench objectives                      # the demo's teacher, 300 student steps each
    ./uta bench objectives --steps 100 --out outputs/bench_objectives

One local Ray. The demo's stages build the teacher (a small CLIP trained on the digits'
captions) and its token cache once; then one student per objective trains from that cache
with the same seed, steps, batches and masks (``data`` order and ``draw_keep`` are seeded), and
each is evaluated zero-shot on the held-out digits with the teacher's text tower. FLOPs are
the analytic student FLOPs of one training step per image (``uta_core.models.flops``).

The paper (ViT-B, ImageNet-21k, 90 epochs): UTA 75.0 >= FD 74.7 > UTA+MIM 70.7 zero-shot,
MIM without zero-shot (its [MASK] tokens make the frozen backbone inconsistent at test time),
UTA at 0.6x the FLOPs of the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from pipelines.demo import cache_config, student_config, teacher_config, teacher_files, write_classifier  # noqa: E402
from pipelines.lib.cache import job as cache_job  # noqa: E402
from pipelines.lib.contrastive import job as contrastive_job  # noqa: E402
from pipelines.lib.demo.config import DEFAULT_CONFIG, Paths, load_demo_config  # noqa: E402
from pipelines.lib.evaluate import job as evaluate_job  # noqa: E402
from pipelines.lib.pretrain import job as pretrain_job  # noqa: E402
from pipelines.lib.ray_setup import cluster_resources, init_ray  # noqa: E402
from uta_core.data.digits import write_digits_splits  # noqa: E402
from uta_core.data.shards import InputConfig  # noqa: E402
from uta_core.models.flops import step_flops, student_shape  # noqa: E402
from uta_core.objectives.alignment import OBJECTIVES  # noqa: E402

PAPER = {"uta": "75.0", "fd": "74.7", "mim": "-", "uta_mim": "70.7"}  # Tab. 6, ImageNet zero-shot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="outputs/bench_objectives")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the demo's)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    args = parser.parse_args(argv)

    overrides = [f"out={args.out}"] + ([f"student.train.max_steps={args.steps}"] if args.steps else [])
    cfg = load_demo_config(DEFAULT_CONFIG, overrides)
    out = Path(cfg.out).resolve()
    paths = Paths(work=out / "runs" / time.strftime("%Y%m%d-%H%M%S"), tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    started = init_ray(None, cfg.ray_cpus)
    rows, seconds = [], {}
    try:
        worker_cpus = max(1, int(cluster_resources()[0]) - 1)
        tcfg = teacher_config(cfg, paths, worker_cpus)
        arch, weights = teacher_files(tcfg, paths)
        paths.work.mkdir(parents=True)
        d = cfg.digits
        write_digits_splits(paths.digits, size=d.size, heldout_fraction=d.heldout_fraction,
                            samples_per_shard=d.samples_per_shard, seed=d.seed, limit=d.limit)
        start = time.perf_counter()
        teacher_top1 = contrastive_job.run(tcfg)["metrics"].get("zeroshot_top1", float("nan"))
        write_classifier(cfg, paths, arch, weights)
        cache_job.run(cache_config(cfg, paths, arch, weights))
        seconds["teacher + cache"] = time.perf_counter() - start
        heldout = InputConfig(paths=[str(paths.digits / "heldout")])
        for objective in args.objectives:
            scfg = student_config(cfg, paths, worker_cpus)
            scfg = dataclasses.replace(
                scfg, run=dataclasses.replace(scfg.run, name=f"bench-{objective}"),
                objective=dataclasses.replace(scfg.objective, name=objective))
            start = time.perf_counter()
            report = pretrain_job.run(scfg)
            seconds[objective] = time.perf_counter() - start
            ecfg = evaluate_job.EvaluateConfig(model=report["export"], input=heldout,
                                               classifier_path=str(paths.classifier), device="cpu")
            top1 = evaluate_job.evaluate(dataclasses.replace(
                ecfg, tracking=dataclasses.replace(ecfg.tracking, enabled=False)))["zeroshot_top1"]
            s = scfg.student
            shape = student_shape(s.variant, img_size=s.img_size, patch_size=s.patch_size, out_dim=s.out_dim)
            flops = step_flops(objective, shape, scfg.mask.mask_ratio).student_step
            rows.append((objective, flops, top1, seconds[objective]))
    finally:
        if started:
            ray.shutdown()

    fd_flops = step_flops("fd", shape, 0.0).student_step
    print(f"\nTab. 6 in miniature: {scfg.student.variant} student, {scfg.train.max_steps} steps x "
          f"{scfg.train.micro_batch} images from one cache, mask {scfg.mask.strategy} {scfg.mask.mask_ratio}, "
          f"seed {scfg.run.seed}; zero-shot on the held-out digits (chance 10%)")
    print(f"  {'objective':<9} {'student MFLOPs/img':>18} {'vs FD':>6} {'zero-shot top-1':>16} "
          f"{'train s':>8} {'paper ZS':>9}")
    for objective, flops, top1, secs in rows:
        print(f"  {objective:<9} {flops / 1e6:>18.1f} {flops / fd_flops:>5.2f}x {top1:>15.1%} {secs:>8.0f} "
              f"{PAPER[objective]:>9}")
    print(f"  teacher (CLIP on the digits' captions): {teacher_top1:.1%} zero-shot; teacher + cache "
          f"{seconds['teacher + cache']:.0f} s; runs in {paths.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

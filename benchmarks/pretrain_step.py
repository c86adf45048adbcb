"""Pre-training step cost: cached vs online teacher, and Ray Train vs a plain PyTorch loop.

    ./uta bench pretrain_step                         # base student, ViT-L-14 teacher, 224 px, mask 0.5
    ./uta bench pretrain_step --batch 4 --steps 5 --skip-ray

Everything is measured in one run on this machine with random-init weights (timing only):
1. plain PyTorch, the job's own step (``uta_core.train.train_step`` behind ``TeacherTargets``):
   ``cache`` (tokens restored from fp16, no teacher) and ``online`` (the frozen teacher's
   forward first), timed round-robin so load drift hits both alike;
2. the same cache-mode step inside a 1-worker Ray Train ``TorchTrainer`` fed by Ray Data
   (``iter_torch_batches``), in rounds alternating with the plain loop on an in-memory batch
   in the same worker process (same threads, same load); and separately what one
   ``ray.train.report`` costs (the job reports only at checkpoints and evaluations).
The analytic FLOPs ratio (``uta_core.models.flops``) is printed next to the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from uta_core.cache.codecs import TokenCodec
from uta_core.data.rows import TeacherTargets
from uta_core.data.views import to_model_input
from uta_core.models.flops import step_flops, student_shape, teacher_shape
from uta_core.models.student import build_student
from uta_core.models.teacher import Teacher
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, draw_keep, prepare_student, step_loss
from uta_core.objectives.masking import MaskConfig, MaskGenerator
from uta_core.optim import OptimConfig, build_optimizer, build_scheduler, train_step

OBJECTIVE = ObjectiveConfig(name="uta")
OPTIM = OptimConfig()


def make_student(args, out_dim: int):
    torch.manual_seed(0)
    student = build_student(args.student, img_size=args.img_size, patch_size=args.patch_size, out_dim=out_dim)
    prepare_student(student, OBJECTIVE)
    optimizer = build_optimizer(student, OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM, warmup_steps=1, total_steps=10_000)
    return StudentForward(student, OBJECTIVE), optimizer, scheduler


def one_step(forward, optimizer, scheduler, batch, targets, mask_gen, step: int) -> float:
    """The job's step on one micro-batch (accumulation 1); returns seconds."""
    start = time.perf_counter()

    def loss():
        images_B3HW, teacher_BND = targets(batch, torch.device("cpu"))
        keep_BK = draw_keep(mask_gen, images_B3HW.shape[0], seed=0, rank=0, step=step)
        return step_loss(forward, images_B3HW, teacher_BND, keep_BK, OBJECTIVE)

    train_step(forward, optimizer, scheduler, [loss], 1, grad_clip=OPTIM.grad_clip)
    return time.perf_counter() - start


def fp16_codec(teacher: Teacher) -> TokenCodec:
    """The cache's default codec at this teacher's token geometry."""
    return TokenCodec(name="float16", token_shape=(1 + teacher.grid[0] * teacher.grid[1], teacher.embed_dim))


def plain_loop(args, teacher: Teacher, batch: dict, mask_gen) -> dict[str, list[float]]:
    """Each mode in blocks (warm-up steps untimed), cache/online/teacher-only, ``args.rounds`` times.

    Blocks rather than step-by-step alternation: a real run stays in one mode, and a ViT-L
    forward between two student steps evicts the memory and kernel caches the next step reuses.
    """
    forward, optimizer, scheduler = make_student(args, teacher.embed_dim)
    cache_targets = TeacherTargets(teacher.mean, teacher.std, codec=fp16_codec(teacher))
    online_targets = TeacherTargets(teacher.mean, teacher.std, teacher)
    modes = {
        "cache": lambda i: one_step(forward, optimizer, scheduler, batch, cache_targets, mask_gen, i),
        "online": lambda i: one_step(forward, optimizer, scheduler, {"image": batch["image"]}, online_targets,
                                     mask_gen, i),
        "teacher": lambda i: timed(lambda: teacher.encode_tokens(to_model_input(batch["image"], teacher.mean,
                                                                                teacher.std))),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            for i in range(args.warmup + args.steps):
                seconds = run(i)
                if i >= args.warmup:
                    times[name].append(seconds)
    return times


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ray_loop(args, teacher: Teacher, batch: dict, mask_gen) -> dict:
    """The cache-mode step in a 1-worker TorchTrainer, alternating per round with the plain loop
    in the same worker process: ``{"ray": [s], "plain": [s], "threads": n}``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    n = args.warmup + args.steps
    rows = [{"image": batch["image"][i % args.batch].numpy(), "tokens": batch["tokens"][i % args.batch].numpy()}
            for i in range(n * args.batch)]
    mean, std, out_dim, codec = teacher.mean, teacher.std, teacher.embed_dim, fp16_codec(teacher)

    def loop(config):
        if args.threads:
            torch.set_num_threads(args.threads)
        forward, optimizer, scheduler = make_student(args, out_dim)
        forward = ray.train.torch.prepare_model(forward)
        targets = TeacherTargets(mean, std, codec=codec)
        shard = ray.train.get_dataset_shard("train")
        times = {"ray": [], "plain": [], "report": [], "threads": torch.get_num_threads()}
        for _ in range(args.rounds):
            plain = [one_step(forward, optimizer, scheduler, batch, targets, mask_gen, i) for i in range(n)]
            times["plain"] += plain[args.warmup:]
            start, ray_times = time.perf_counter(), []
            for i, b in enumerate(shard.iter_torch_batches(batch_size=args.batch, drop_last=True)):
                one_step(forward, optimizer, scheduler, b, targets, mask_gen, i)
                now = time.perf_counter()
                ray_times.append(now - start)  # data fetch + step
                start = now
            times["ray"] += ray_times[args.warmup:]
            times["report"].append(timed(lambda: ray.train.report({"round": len(times["report"])})))
        # Result.metrics only carries metrics reported with a checkpoint: hand the times over in a file.
        Path(out_file).write_text(json.dumps(times))

    cpus = args.threads or os.cpu_count() or 1
    out_file = Path(args.storage) / f"times-{os.getpid()}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        trainer = TorchTrainer(
            loop,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(name=f"bench-{os.getpid()}", storage_path=args.storage),
            datasets={"train": ray.data.from_items(rows)},
        )
        trainer.fit()
    finally:
        ray.shutdown()
    return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="base")
    parser.add_argument("--teacher", default="ViT-L-14")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every block")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per mode in the plain loop")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the driver and the Ray worker (default: torch's choice). On a "
                             "shared machine use 1: OpenMP barriers with a descheduled thread make 2-thread "
                             "timings swing 10x with other processes' load")
    parser.add_argument("--report-every", type=int, default=100, help="steps between reports, for the amortised cost")
    parser.add_argument("--storage", default="/tmp/uta-bench-ray")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = Teacher.from_open_clip(args.teacher, None, image_size=args.img_size)
    grid = (args.img_size // args.patch_size,) * 2
    mask_gen = MaskGenerator(MaskConfig(strategy="block_reversed", mask_ratio=args.mask_ratio), grid)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch, args.img_size, args.img_size, 3), dtype=torch.uint8, generator=gen)
    tokens = teacher.encode_tokens(to_model_input(pixels, teacher.mean, teacher.std))
    codec = fp16_codec(teacher)
    batch = {"image": pixels, "tokens": torch.from_numpy(codec.encode(tokens))}  # as cached

    times = plain_loop(args, teacher, batch, mask_gen)
    if not args.skip_ray:
        times.update({f"ray_{k}": v for k, v in ray_loop(args, teacher, batch, mask_gen).items()})
    flops = step_flops("uta", student_shape(args.student, img_size=args.img_size, patch_size=args.patch_size,
                                            out_dim=teacher.embed_dim), args.mask_ratio,
                       teacher_shape(args.teacher, image_size=args.img_size))
    print(f"\nstudent {args.student} /{args.patch_size} @ {args.img_size} px, mask {args.mask_ratio}, teacher "
          f"{args.teacher} (random init), batch {args.batch}, {args.rounds} x {args.steps} timed steps per row, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print_table(times, flops.student_step / flops.total, args)


def print_table(times: dict, flops_ratio: float, args) -> None:
    """Ratios use the fastest step of each row: on a shared machine the minimum is the least
    disturbed measurement (the median is shown as well)."""
    best = {k: min(v) for k, v in times.items() if isinstance(v, list) and v}
    med = {k: statistics.median(v) for k, v in times.items() if isinstance(v, list) and v}
    rows = [
        ("cache step, plain PyTorch", "cache", "1.00 (reference)"),
        ("online step, plain PyTorch", "online", f"{best['online'] / best['cache']:.2f} x cache"),
        ("teacher forward alone", "teacher", f"{best['teacher'] / best['online']:.2f} of online"),
        ("cache / online step time", None,
         f"{best['cache'] / best['online']:.2f} (analytic FLOPs predict {flops_ratio:.2f})"),
    ]
    if "ray_ray" in best:
        inside, ray_step, report = best["ray_plain"], best["ray_ray"], med["ray_report"]
        rows += [
            (f"cache step, plain loop in the Ray worker ({times['ray_threads']} thr)", "ray_plain",
             f"{inside / best['cache']:.2f} x plain in the driver"),
            ("cache step, Ray Train loop (Ray Data ingest)", "ray_ray",
             f"{ray_step / inside:.2f} x plain in the same worker ({ray_step - inside:+.3f} s/step)"),
            ("one ray.train.report", "ray_report",
             f"{report / (args.report_every * inside):.4f} x a step when reported every {args.report_every} steps"),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'min s':>7}  {'median s':>8}  ratio (by min)")
    for name, key, ratio in rows:
        cells = f"{best[key]:7.3f}  {med[key]:8.3f}" if key else f"{'':7}  {'':8}"
        print(f"{name:<{width}}  {cells}  {ratio}")


if __name__ == "__main__":
    main()

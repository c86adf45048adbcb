"""What a training step costs on this machine, and what the runtime around the loop adds.

    ./uta bench pretrain_step                       # the demo's two training stages, 60 steps each
    ./uta bench pretrain_step --steps 30 --jobs student

Measured side by side in one run, with the demo's geometry (digits at 16 px; the student stage:
a nano student from a teacher cache of 2 JPEG views per image, 128 images a step, mask 0.5; the
teacher stage: a 4-layer width-128 CLIP, 128 images a step), random-init weights:

1. the job's own step alone (``train_step`` on one prepared batch, no data path), in this process
   and inside a bare 1-worker Ray Train worker with the same torch threads;
2. the job's whole loop (``train_worker``: its epoch stream, prefetch, steps, logging) in three
   runtimes: in this process (``LocalRuntime``: no Ray), a 1-worker TorchTrainer reading each
   rank's sources with Ray tasks (``RayRuntime``, what the jobs run), and the same reading each
   epoch through a Ray Data dataset (how the loop read before), each for ``--steps`` steps;
   the step time is the median of the loop's own ``step_time_s`` windows after the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pipelines.lib.cache.config import CacheConfig  # noqa: E402
from pipelines.lib.contrastive.config import DEFAULT_CONFIG as CLIP_DEFAULTS  # noqa: E402
from pipelines.lib.contrastive.config import ContrastiveJobConfig  # noqa: E402
from pipelines.lib.contrastive.job import plan_contrastive  # noqa: E402
from pipelines.lib.demo.config import DEFAULT_CONFIG as DEMO_CONFIG  # noqa: E402
from pipelines.lib.demo.config import load_demo_config  # noqa: E402
from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig  # noqa: E402
from pipelines.lib.pretrain.job import plan_pretrain  # noqa: E402
from pipelines.lib.ray_setup import start_local_ray  # noqa: E402
from pipelines.lib.train.backends import InProcess  # noqa: E402
from pipelines.lib.train.launch import resolve_paths, run_folder  # noqa: E402
from pipelines.lib.train.loop import TrainLoop, train_worker  # noqa: E402
from pipelines.lib.train.ray_runtime import RayRuntime  # noqa: E402
from pipelines.lib.train.runtime import LocalRuntime  # noqa: E402
from uta_core.cache.writer import write_in_process  # noqa: E402
from uta_core.config import load_config  # noqa: E402
from uta_core.data.digits import write_digits_splits  # noqa: E402
from uta_core.data.epochs import Cursor  # noqa: E402
from uta_core.models.clip import ClipModelConfig, build_clip, save_clip  # noqa: E402
from uta_core.optim import train_step  # noqa: E402

DEMO_SIZE = load_demo_config(DEMO_CONFIG, []).digits.size  # configs/demo.yaml: 16 px


# --------------------------------------------------------------------- the demo's two stages
def workspace(root: Path, size: int = DEMO_SIZE) -> dict[str, str]:
    """Digits, a random-init teacher of the demo teacher's geometry in files, its 2-view JPEG cache."""
    write_digits_splits(root / "digits", size=size)
    clip = ClipModelConfig()
    clip = dataclasses.replace(clip, name=f"{clip.name}-{size}px", vision={**clip.vision, "image_size": size})
    arch, weights = save_clip(build_clip(clip), clip, root / "teacher")
    write_in_process(load_config(CacheConfig, None, [
        f"input.paths={root / 'digits' / 'train'}", f"output.path={root / 'cache'}", f"teacher.arch={arch}",
        f"teacher.pretrained={weights}", "teacher.precision=fp32", f"views.size={size}", "num_views=2",
        "views.scale=[0.85, 1.0]", "views.hflip=false", "tracking.enabled=false"]))
    return {"root": str(root), "arch": str(arch), "weights": str(weights), "size": str(size)}


def job_and_plan(name: str, ws: dict[str, str], steps: int, threads: int):
    common = [f"run.name={name}-{time.time_ns()}", f"run.storage_path={ws['root']}/runs", "run.log_every=10",
              "run.checkpoint_every=100000", "run.export=false", "tracking.enabled=false", "cluster.num_workers=1",
              f"cluster.cpus_per_worker={threads}", f"train.max_steps={steps}", "train.warmup_steps=5"]
    if name == "student":
        cfg = load_config(PretrainConfig, DEFAULT_CONFIG, common + [
            "data.teacher_mode=cache", f"data.cache={ws['root']}/cache", "data.shuffle_buffer=2048",
            "student.variant=nano", f"student.img_size={ws['size']}", "student.patch_size=4", "student.out_dim=128",
            "mask.strategy=random", "mask.mask_ratio=0.5", "train.micro_batch=128", "train.precision=fp32"])
        cfg = resolve_paths(cfg)
        return plan_pretrain(cfg, run_folder(cfg), InProcess())
    cfg = load_config(ContrastiveJobConfig, CLIP_DEFAULTS, common + [
        f"data.input.paths={ws['root']}/digits/train", "train.micro_batch=128", f"data.views.size={ws['size']}",
        f"model.clip.vision.image_size={ws['size']}"])
    cfg = resolve_paths(cfg)
    return plan_contrastive(cfg, run_folder(cfg))


def median_step(history: list[dict]) -> float:
    return statistics.median(h["step_time_s"] for h in history[1:])  # the first window holds the warm-up


# --------------------------------------------------------------------- 1. the step alone
def step_seconds(job, plan, runtime, steps: int) -> list[float]:
    """``steps`` optimiser steps of the job's loop on one fixed, prepared micro-batch: no data path."""
    loop = TrainLoop(job, plan, runtime, run_folder(job.cfg))
    batch, _ = next(loop.stream.batches(0, Cursor()))
    prepared = loop.task.prepare(batch, 0, 0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = train_step(loop.forward, loop.optimizer, loop.scheduler, [lambda: loop.task.loss(loop.forward,
                                                                                                 prepared)], 1,
                         grad_clip=job.cfg.optim.grad_clip)
        out["loss"].item()
        times.append(time.perf_counter() - start)
    return times[2:]


def bare_worker(config: dict) -> dict:
    runtime = RayRuntime(config["job"], run_folder(config["job"].cfg), None)
    return {"median": statistics.median(step_seconds(config["job"], config["plan"], runtime, config["steps"]))}


# --------------------------------------------------------------------- 2. the whole loop
class RayDataRuntime(RayRuntime):
    """The loop's sources read each epoch through a Ray Data dataset (order preserved), as before."""

    def read(self, reader, tasks):
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.from_items([{"i": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
        ds = ds.map_batches(_read_tasks, fn_kwargs={"reader": reader, "tasks": tasks}, batch_size=1,
                            batch_format="numpy")
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def _read_tasks(batch: dict, reader, tasks):
    for i in batch["i"]:
        yield from reader(*tasks[int(i)])


def ray_worker(config: dict) -> dict:
    run = run_folder(config["job"].cfg)
    runtime = (RayDataRuntime if config["reader"] == "ray data" else RayRuntime)(config["job"], run, None)
    out = train_worker(config["job"], config["plan"], runtime, run)
    return {"median": median_step(out["history"])}


def in_ray(fn, config: dict, threads: int, storage: str) -> dict:
    trainer = TorchTrainer(fn, train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                           run_config=ray.train.RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage))
    start = time.perf_counter()
    result = trainer.fit()
    return {**result.return_value, "seconds": time.perf_counter() - start}


def measure(name: str, ws: dict, args) -> dict[str, float]:
    threads = args.threads
    job, plan = job_and_plan(name, ws, args.steps, threads)
    local = LocalRuntime(run_folder(job.cfg), 1, threads=threads)
    out = {"step, in this process": statistics.median(step_seconds(job, plan, local, args.step_repeats))}
    out["step, in a Ray Train worker"] = in_ray(bare_worker, {"job": job, "plan": plan, "steps": args.step_repeats},
                                                threads, ws["root"])["median"]
    start = time.perf_counter()
    history = train_worker(job, plan, local, local.run)["history"]
    out["loop, in this process (no Ray)"] = median_step(history)
    seconds = {"loop, in this process (no Ray)": time.perf_counter() - start}
    for reader, label in (("tasks", "loop, Ray Train + Ray tasks (the jobs)"),
                          ("ray data", "loop, Ray Train + Ray Data per epoch (before)")):
        job, plan = job_and_plan(name, ws, args.steps, threads)
        result = in_ray(ray_worker, {"job": job, "plan": plan, "reader": reader}, threads, ws["root"])
        out[label], seconds[label] = result["median"], result["seconds"]
    return {k: (v, seconds.get(k)) for k, v in out.items()}


def print_table(name: str, rows: dict, args) -> None:
    base = rows["step, in this process"][0]
    loop_base = rows["loop, in this process (no Ray)"][0]
    print(f"\n{name} stage: {args.steps} steps of 128 images, torch threads {args.threads}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  {'measurement':<46} {'s/step':>7} {'vs step':>8} {'vs loop':>8} {'run s':>6}")
    for label, (value, seconds) in rows.items():
        vs_loop = f"{value / loop_base:7.2f}x" if label.startswith("loop") else ""
        run_s = f"{seconds:6.0f}" if seconds else ""
        print(f"  {label:<46} {value:7.3f} {value / base:7.2f}x {vs_loop:>8} {run_s:>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of each loop run")
    parser.add_argument("--step-repeats", type=int, default=12, help="timed steps of the step alone")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--jobs", nargs="+", default=["student", "teacher"], choices=["student", "teacher"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    with tempfile.TemporaryDirectory(prefix="uta-bench-step-") as folder:
        ws = workspace(Path(folder))
        start_local_ray(args.threads + 1, log_to_driver=False)
        try:
            results = {name: measure(name, ws, args) for name in args.jobs}
        finally:
            ray.shutdown()
    for name, rows in results.items():
        print_table(name, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

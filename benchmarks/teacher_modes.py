"""Where the teacher's work lands in each teacher mode, at ViT-L/14 token geometry: the training
worker's own CPU per step (online, cache, stream side by side) and the teacher pool's views/s.

    ./uta bench teacher_modes                    # 24-layer narrow teacher, 20 steps of 16 views
    ./uta bench teacher_modes --depth 2 --steps 10

Geometry: 224 px views, patch 14, a random-init teacher tower of ``--depth`` layers (24, ViT-L/14's
depth) at width 64 with a 768-d joint space, so 257 x 768 tokens per view; a nano student at
224 px / patch 14 aligned to them (mask 0.5, ``--batch`` views a step). Input: 256 px JPEG crops of
scikit-learn's two photographs.

Each mode runs the same loop (``train_worker`` with ``LocalRuntime``: it reads its sources in the
trainer's own process, one torch thread) for ``--steps`` steps:
- online: the teacher runs in the trainer;
- cache: tokens from a ``lowrank_int8`` cache of the same views (written before the run);
- stream: every block goes through a one-actor teacher pool on a local Ray (its own CPU and
  thread), tokens back in ``lowrank_int8``.
Trainer CPU/step: this process's CPU time (all its threads) over the steps after the first log
window; wait/step: what the trainer waited on the pool (``stage_wait_s``). Pool views/s: the same
blocks through 1 and 2 actors, measured apart. Run it alone: two cores shared give noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks.cache_throughput import photo_crops  # noqa: E402
from pipelines.lib.cache.config import CacheConfig  # noqa: E402
from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig  # noqa: E402
from pipelines.lib.pretrain.job import plan_pretrain  # noqa: E402
from pipelines.lib.ray_setup import start_local_ray  # noqa: E402
from pipelines.lib.train.backends import InProcess  # noqa: E402
from pipelines.lib.train.config import PoolConfig  # noqa: E402
from pipelines.lib.train.launch import resolve_paths, run_folder  # noqa: E402
from pipelines.lib.train.loop import train_worker  # noqa: E402
from pipelines.lib.train.runtime import LocalRuntime  # noqa: E402
from pipelines.lib.train.spec import Stage  # noqa: E402
from pipelines.lib.train.stage_pool import PoolMeter, start_pool, stop_pool  # noqa: E402
from uta_core.cache.writer import write_in_process  # noqa: E402
from uta_core.config import load_config  # noqa: E402
from uta_core.data.digits import webdataset_bytes  # noqa: E402
from uta_core.data.rows import BLOCK_ROWS  # noqa: E402
from uta_core.data.stream import serial_read  # noqa: E402

SIZE, PATCH, DIM = 224, 14, 768


class Clock:
    """The loop's progress hook: this process's CPU and wall time at every log step."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float, float]] = []

    def step(self, step: int, metrics: dict | None = None) -> None:
        self.marks.append((step, time.process_time(), time.perf_counter()))


class PoolRuntime(LocalRuntime):
    """The loop in this process, its blocks through a stage pool on Ray (as a Ray Train worker sends them)."""

    def __init__(self, pool, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool, self.meter = pool, PoolMeter()

    def read(self, reader, tasks):
        return self.pool.through((ray.put(block) for block in serial_read(reader, tasks)), 0, self.meter)

    def read_metrics(self, steps: int, window_s: float) -> dict[str, float]:
        return {"stage_wait_s": self.meter.read().wait_s / max(1, steps)}


def workspace(root: Path, args) -> list[str]:
    (root / "shards").mkdir(parents=True)
    samples = photo_crops(args.images, size=SIZE + 32)
    per = -(-args.images // 4)
    for i in range(4):
        shard = webdataset_bytes(samples[i * per:(i + 1) * per], image_ext="jpg")
        (root / "shards" / f"{i:05d}.tar").write_bytes(shard)
    tower = {"embed_dim": DIM, "vision_cfg": {"image_size": SIZE, "patch_size": PATCH, "width": 64,
                                              "layers": args.depth, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
    (root / "teacher.json").write_text(json.dumps(tower))
    teacher = [f"teacher.arch={root / 'teacher.json'}", "teacher.pretrained=null", "teacher_random_seed=0",
               "teacher.precision=fp32"]
    write_in_process(load_config(CacheConfig, None, [
        f"input.paths={root / 'shards'}", f"output.path={root / 'cache'}", *teacher, f"views.size={SIZE}",
        "num_views=1", "output.token_codec=lowrank_int8", "output.token_rank=64", "output.basis_views=256",
        "tracking.enabled=false"]))
    return teacher


def config(root: Path, mode: str, teacher: list[str], args) -> PretrainConfig:
    data = ([f"data.cache={root / 'cache'}"] if mode == "cache" else
            [f"data.input.paths={root / 'shards'}", f"data.num_samples={args.images}"])
    return load_config(PretrainConfig, DEFAULT_CONFIG, [
        f"run.name={mode}-{time.time_ns()}", f"run.storage_path={root / 'runs'}", f"run.log_every={args.window}",
        "run.checkpoint_every=100000", "run.export=false", "tracking.enabled=false", "cluster.num_workers=1",
        "cluster.cpus_per_worker=1", f"data.teacher_mode={mode}", *data, f"data.views.size={SIZE}",
        "student.variant=nano", f"student.img_size={SIZE}", f"student.patch_size={PATCH}", f"student.out_dim={DIM}",
        f"train.micro_batch={args.batch}", f"train.max_steps={args.steps}", "train.warmup_steps=2",
        "train.precision=fp32", "stream.codec=lowrank_int8", "stream.token_rank=64", "stream.basis_views=256",
        "stream.pool.cpus_per_actor=1", *teacher])


def planned(cfg: PretrainConfig):
    cfg = resolve_paths(cfg)
    return plan_pretrain(cfg, run_folder(cfg), InProcess())


def run_mode(root: Path, mode: str, teacher: list[str], args) -> dict[str, float]:
    job, plan = planned(config(root, mode, teacher, args))
    pool = start_pool(job.stage(on_pool=True)) if mode == "stream" else None
    make = (lambda *a, **k: PoolRuntime(pool, *a, **k)) if pool else LocalRuntime
    runtime = make(run_folder(job.cfg), 1, threads=1, stage=None)
    runtime.progress = clock = Clock()
    try:
        history = train_worker(job, plan, runtime, runtime.run)["history"]
    finally:
        if pool:
            stop_pool(pool)
    (s0, cpu0, wall0), (s1, cpu1, wall1) = clock.marks[0], clock.marks[-1]
    steps = s1 - s0
    waits = [h.get("stage_wait_s", 0.0) for h in history[1:]]
    codec_bytes = job.source.open(job.cfg.student, "cpu").codec.bytes_per_view if mode != "online" else 0
    return {"cpu": (cpu1 - cpu0) / steps, "wall": (wall1 - wall0) / steps,
            "wait": sum(waits) / len(waits) if waits else 0.0, "bytes": codec_bytes}


def pool_rate(root: Path, teacher: list[str], args, actors: int) -> float:
    job, plan = planned(config(root, "stream", teacher, args))
    stage = job.stage(on_pool=True)
    blocks = [ray.put(b) for item in plan.sources.items for b in job.reader(0)(item, 0, 0)]
    pool = start_pool(Stage(stage.work, PoolConfig(actors=actors, cpus_per_actor=1, blocks_in_flight=2 * actors),
                            "teacher pool"))
    try:
        list(pool.through(iter(blocks[:actors]), 0))  # warm-up
        start = time.perf_counter()
        views = sum(len(b["tokens"]) for b in pool.through(iter(blocks), 0))
        return views / (time.perf_counter() - start)
    finally:
        stop_pool(pool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--depth", type=int, default=24, help="teacher tower layers (width 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=5, help="steps per log window (the first is warm-up)")
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="uta-bench-modes-") as folder:
        root = Path(folder)
        teacher = workspace(root, args)
        start_local_ray(3, log_to_driver=False)
        try:
            rows = {mode: run_mode(root, mode, teacher, args) for mode in ("cache", "stream", "online")}
            rates = {n: pool_rate(root, teacher, args, n) for n in (1, 2)}
        finally:
            ray.shutdown()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nteacher: random-init {args.depth}-layer width-64 tower, {SIZE} px / patch {PATCH} / {DIM}-d -> "
          f"{1 + (SIZE // PATCH) ** 2} x {DIM} tokens per view; student nano, {args.batch} views a step; "
          f"{args.steps} steps; trainer 1 torch thread; {os.cpu_count()} CPUs; load average {load}")
    print("| mode | trainer CPU s/step | vs cache | wall s/step | wait on teachers s/step | token bytes/view |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['cpu']:.3f} | {r['cpu'] / rows['cache']['cpu']:.2f}x | {r['wall']:.3f} | "
              f"{r['wait']:.3f} | {r['bytes'] or '-'} |")
    block = BLOCK_ROWS * (SIZE * SIZE * 3 + rows["stream"]["bytes"])  # a block of views: pixels in, tokens back
    print(f"object store bound of the stream run: blocks_in_flight 4 x {block / 2**20:.1f} MiB a block "
          f"({BLOCK_ROWS} views of {SIZE}x{SIZE}x3 uint8 pixels + {rows['stream']['bytes']} token bytes)")
    print(f"\nteacher pool, views/s: 1 actor {rates[1]:.1f}, 2 actors {rates[2]:.1f} ({rates[2] / rates[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The teacher cache at real token geometry: per codec, whole-job views/s, driver CPU per view,
bytes per view, token fidelity, and the training loader's views/s on one core.

    ./uta bench cache_throughput                       # ViT-L/14 geometry on this machine's CPUs
    ./uta bench cache_throughput --arch ViT-L-14-quickgelu --pretrained openai --images 20000 \
        --shards 40 --codecs float16,lowrank_int8      # a GPU node: real teacher, bf16, batch 256

Teacher: by default ``--geometry L14``, a random-init 1-layer, width-64 open_clip tower with
ViT-L/14's geometry (224 px, patch 14, 768-d joint space -> 257 x 768 tokens per view), so
the job's data path is measured at real sizes while the teacher costs little. ``--arch``
(+ ``--pretrained``) runs any open_clip model instead (on a GPU: ``ray.device=auto`` picks
CUDA and the teacher runs bf16). Input: 256 px JPEG crops of scikit-learn's two photographs.

For each codec, one cache job on one local Ray; then, from the cache it wrote:
- job views/s (the job's clock: pipeline start to last commit) and the driver's CPU per view
  (CPU time of the driver process over the pipeline / views);
- bytes per view on disk, and of it the codec's token bytes and the stored JPEG view;
- cosine of restored vs the fp32 teacher's tokens on every cached view (CLS; patches mean, min);
- the training loader (``uta_core.cache.reader.cache_file_rows``: read a part file, decode the
  JPEG views, hand on the token bytes) on one thread, views/s; and the codec's restore on CPU
  (on a GPU trainer it runs on the device).
Run it alone: two cores shared with another job give noise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cache.job import execute
from pipelines.lib.ray_setup import init_ray
from uta_core.cache.format import load_codec, open_cache
from uta_core.cache.plan import build_cache_teacher, plan_cache
from uta_core.cache.reader import CachePart, cache_file_rows
from uta_core.config import load_config
from uta_core.data.digits import webdataset_bytes
from uta_core.data.shards import Sample
from uta_core.data.storage import join
from uta_core.data.views import to_model_input

GEOMETRIES = {  # (image size, patch, joint dim): a narrow tower of that geometry
    "L14": (224, 14, 768),
    "tiny": (32, 4, 32),  # the CI's smoke run
}


def narrow_tower(size: int, patch: int, dim: int) -> dict:
    return {"embed_dim": dim, "vision_cfg": {"image_size": size, "patch_size": patch, "width": 64, "layers": 1,
                                             "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}


def photo_crops(count: int, size: int = 256, seed: int = 0) -> list[Sample]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real photographs, 427 x 640
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(photo[top : top + size, left : left + size]).save(buf, format="JPEG", quality=90)
        samples.append(Sample(key=f"{i:09d}", image=buf.getvalue(), label=i % 2, caption=None))
    return samples


def cache_config(args, workdir: Path, codec: str, teacher: list[str], size: int) -> CacheConfig:
    return load_config(CacheConfig, None, [
        f"input.paths={workdir / 'shards'}", f"output.path={workdir / codec}", f"output.token_codec={codec}",
        f"output.token_rank={args.rank}", f"output.basis_views={args.basis_views}", *teacher,
        f"views.size={size}", f"num_views={args.views}", f"ray.num_cpus={args.num_cpus}",
        f"ray.images_per_block={args.images_per_block}", "ray.progress_bars=false", "tracking.enabled=false",
    ])


def loader_rate(fs, root: str, manifest, codec) -> tuple[float, float, float]:
    """(views/s of cache_file_rows on one core as training reads it, each part's size and sha256 checked
    (``uta_core.cache.verify``); the same without the check; views/s of the codec's restore on one CPU
    thread). The two reads alternate part by part, twice over, so that both see the same machine."""
    threads = (pa.cpu_count(), torch.get_num_threads())
    pa.set_cpu_count(1)  # Arrow decompresses on a thread pool: one core, as the rate is per core
    torch.set_num_threads(1)
    parts = [CachePart(path=join(root, p.file), shard=name, file=p.file, bytes=p.bytes, sha256=p.sha256,
                       xxh3_128=p.xxh3_128)
             for name in sorted(manifest.shards) for p in manifest.shards[name].parts]
    seconds = {True: 0.0, False: 0.0}
    restore_s, views = 0.0, 0
    for _ in range(2):
        for part in parts:
            for verified in (True, False):
                start = time.perf_counter()
                batches = list(cache_file_rows(fs, part.path, block=256, expect=part if verified else None))
                seconds[verified] += time.perf_counter() - start
            for batch in batches:
                start = time.perf_counter()
                codec.decode(batch["tokens"])
                restore_s += time.perf_counter() - start
                views += len(batch["tokens"])
    pa.set_cpu_count(threads[0])
    torch.set_num_threads(threads[1])
    return views / seconds[True], views / seconds[False], views / restore_s


def fidelity(cfg: CacheConfig, fs, root, manifest, codec) -> dict[str, float]:
    """Restored tokens vs the fp32 teacher's on the stored (decoded) views of every cached row."""
    teacher = build_cache_teacher(cfg)  # CPU fp32: the reference
    cos = []
    for path, _ in manifest.files():
        for batch in cache_file_rows(fs, f"{root}/{path}", block=64):
            pixels = torch.from_numpy(batch["image"])
            with torch.no_grad():
                ref = teacher.encode_tokens(to_model_input(pixels, teacher.mean, teacher.std)).float()
            restored = codec.decode(batch["tokens"])
            cos.append(F.cosine_similarity(restored, ref, dim=-1))
    cos_BT = torch.cat(cos)
    return {"cls": cos_BT[:, 0].mean().item(), "patch_mean": cos_BT[:, 1:].mean().item(),
            "patch_min": cos_BT[:, 1:].min().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="L14")
    parser.add_argument("--arch", default=None, help="an open_clip model instead of the narrow tower")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--size", type=int, default=None, help="view size with --arch (default: the model's)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--images-per-block", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--codecs", default="float16,int8,lowrank_int8")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--basis-views", type=int, default=256)
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fp32 reference (slow for a big teacher)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="uta-cache-bench-"))
    if args.arch:
        teacher = [f"teacher.arch={args.arch}", f"teacher.pretrained={args.pretrained or 'null'}"]
        if not args.pretrained:
            teacher.append("teacher_random_seed=0")
        size = args.size or 224
        described = f"{args.arch} ({args.pretrained or 'random init'})"
    else:
        size, patch, dim = GEOMETRIES[args.geometry]
        (workdir / "narrow.json").write_text(json.dumps(narrow_tower(size, patch, dim)))
        teacher = [f"teacher.arch={workdir / 'narrow.json'}", "teacher.pretrained=null", "teacher_random_seed=0"]
        described = f"1-layer width-64 tower, {size} px / patch {patch} / {dim}-d (random init)"
    (workdir / "shards").mkdir()
    samples = photo_crops(args.images, size=max(size + 32, 64))
    per = -(-args.images // args.shards)
    for i in range(args.shards):
        (workdir / "shards" / f"{i:05d}.tar").write_bytes(
            webdataset_bytes(samples[i * per : (i + 1) * per], image_ext="jpg"))

    init_ray(num_cpus=args.num_cpus)  # one local Ray for every codec
    rows, header = [], None
    for name in args.codecs.split(","):
        cfg = cache_config(args, workdir, name, teacher, size)
        report = execute(plan_cache(cfg))
        s = report["summary"]
        fs, root, manifest, paths = open_cache(str(workdir / name))
        codec = load_codec(fs, root, manifest)
        views = s["views"]
        read_rate, unverified_rate, restore_rate = loader_rate(fs, root, manifest, codec)
        T, D = manifest.settings.token_shape
        fid = None if args.no_fidelity else fidelity(cfg, fs, root, manifest, codec)
        header = (T, D, views)
        rows.append([
            name, f"{views / s['seconds']:.1f}", f"{s['driver_cpu_ms_per_view']:.3f}",
            f"{s['bytes_per_view'] / 1e3:.1f}", f"{codec.bytes_per_view / 1e3:.1f}",
            f"{(2 * T * D) / codec.bytes_per_view:.1f}x",
            "-" if fid is None else f"{fid['cls']:.5f}",
            "-" if fid is None else f"{fid['patch_mean']:.5f} / {fid['patch_min']:.4f}",
            f"{read_rate:.0f}", f"{unverified_rate:.0f}", f"{100 * (unverified_rate / read_rate - 1):+.1f}%",
            f"{restore_rate:.0f}",
        ])
    T, D, views = header
    load = os.getloadavg()
    print(f"teacher: {described} -> {T} x {D} tokens per view; {args.images} images x {args.views} views = "
          f"{views} views in {args.shards} shards; local Ray with {args.num_cpus} CPUs; torch threads "
          f"{torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    cols = ["codec", "job views/s", "driver ms/view", "KB/view on disk", "token KB/view", "fp16 / codec",
            "cos CLS", "cos patches mean / min", "loader views/s (1 thread, verified)", "unverified",
            "verify cost", "restore views/s (CPU)"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher caching on this machine: whole-job images/s, bytes per view, fp16 vs int8 fidelity.

    ./uta bench cache_throughput [--images 128] [--shards 4] [--num-cpus 2]

One run caches the same WebDataset shards twice with a small random-init ViT teacher
(ViT-S-ish: width 384, 6 layers, patch 16, 224 px -> 14x14 tokens, D = 512), once with
fp16 and once with int8 tokens, on a local Ray. Input images are 256 px crops of the two
photographs scikit-learn ships (JPEG q90, as img2dataset stores them), so the PNG view
sizes are those of natural images. Then, on every cached view, it recomputes the fp32
teacher tokens from the stored pixels and compares:
- cos(fp16, fp32) and cos(int8 restored, fp32), and mean |difference| of the two;
- the UTA loss (random mask ratio 0.4, CLS counted as a token) of a student proxy
  against fp32 / fp16 / int8 targets. The proxy is the fp32 tokens plus Gaussian noise
  (token cosine ~0.7, a half-trained student); a random student gives differences near 0.
- for reference, the L2-normalise x 127 int8 scheme the first format draft proposed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cache.job import execute
from pipelines.lib.ray_setup import init_ray
from uta_core.cache.format import open_cache, read_cache_rows
from uta_core.cache.plan import build_cache_teacher, plan_cache
from uta_core.config import load_config
from uta_core.data.views import to_model_input
from uta_core.objectives.alignment import gather_kept, uta_loss
from uta_core.objectives.masking import MaskConfig, MaskGenerator
from uta_core.data.digits import webdataset_bytes
from uta_core.data.shards import Sample

SMALL_TEACHER = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 384, "layers": 6, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


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


def cache_once(workdir: Path, shards: Path, token_dtype: str, num_cpus: int) -> tuple[dict, float]:
    cfg = load_config(CacheConfig, None, [
        f"input.paths={shards}", f"output.path={workdir / token_dtype}", f"output.token_dtype={token_dtype}",
        f"teacher.arch={workdir / 'uta-bench-small.json'}", "teacher.pretrained=null", "teacher_random_seed=0",
        "views.size=224", "num_views=2", f"ray.num_cpus={num_cpus}", "ray.batch_size=32",
        "ray.images_per_block=16", "ray.progress_bars=false", "tracking.enabled=false",
    ])
    start = time.perf_counter()
    report = execute(plan_cache(cfg))  # the job's own clock starts after planning
    return report, time.perf_counter() - start


def load_rows(uri: str) -> tuple[dict, torch.Tensor, torch.Tensor, int, int]:
    """All rows sorted by (key, view): pixels, tokens (restored to float), token and pixel bytes."""
    fs, _, manifest, paths = open_cache(uri)
    table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths])
    order = sorted(range(table.num_rows), key=lambda i: (table["key"][i].as_py(), table["view"][i].as_py()))
    table = table.take(order)
    pixels, tokens = read_cache_rows(table)
    pixel_bytes = sum(len(b) for b in table.column("pixels").to_pylist())
    file_bytes = sum(r.bytes for r in manifest.shards.values())
    return manifest, pixels, tokens, pixel_bytes, file_bytes


def l2_times_127(t_BTD: torch.Tensor) -> torch.Tensor:
    """The first draft's int8 scheme, for comparison."""
    q = torch.round(F.normalize(t_BTD, dim=-1) * 127).clamp(-127, 127)
    return F.normalize(q, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_cpus)
    workdir = Path(tempfile.mkdtemp(prefix="uta-cache-bench-"))
    (workdir / "uta-bench-small.json").write_text(json.dumps(SMALL_TEACHER))
    shard_dir = workdir / "shards"
    shard_dir.mkdir()
    samples = photo_crops(args.images)
    per = -(-args.images // args.shards)
    for i in range(args.shards):
        (shard_dir / f"{i:05d}.tar").write_bytes(webdataset_bytes(samples[i * per : (i + 1) * per], image_ext="jpg"))

    init_ray(num_cpus=args.num_cpus)  # one local Ray for both runs
    runs = {dtype: cache_once(workdir, shard_dir, dtype, args.num_cpus) for dtype in ("float16", "int8")}

    m16, pix16, tok16, pixel_bytes, bytes16 = load_rows(str(workdir / "float16"))
    m8, pix8, tok8, _, bytes8 = load_rows(str(workdir / "int8"))
    assert torch.equal(pix16, pix8), "the two runs must cache identical views"
    views = pix16.shape[0]
    cfg = load_config(CacheConfig, None, [
        "input.paths=x", "output.path=x", f"teacher.arch={workdir / 'uta-bench-small.json'}",
        "teacher.pretrained=null", "teacher_random_seed=0", "views.size=224"])
    teacher = build_cache_teacher(cfg)
    with torch.no_grad():
        ref = torch.cat([teacher.encode_tokens(to_model_input(pix16[i : i + 32], teacher.mean, teacher.std))
                         for i in range(0, views, 32)])
    cos16 = F.cosine_similarity(tok16, ref, dim=-1)
    cos8 = F.cosine_similarity(tok8, ref, dim=-1)
    cos_l2 = F.cosine_similarity(l2_times_127(ref), ref, dim=-1)

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=gen) * ref.norm(dim=-1, keepdim=True) / ref.shape[-1] ** 0.5
    student = ref + 1.0 * noise  # token cosine to the teacher ~0.7
    keep = MaskGenerator(MaskConfig(strategy="random", mask_ratio=0.4), tuple(m16.settings.grid))(views, gen)
    losses = {name: uta_loss(gather_kept(student, keep), gather_kept(t, keep)).item()
              for name, t in (("fp32", ref), ("fp16", tok16), ("int8", tok8), ("int8 L2x127", l2_times_127(ref)))}
    student_cos = F.cosine_similarity(student, ref, dim=-1).mean().item()

    T, D = m16.settings.token_shape
    rows = [
        ("images / views / shards", f"{args.images} / {views} / {args.shards}"),
        ("teacher", f"random-init ViT width 384, 6 layers, /16 @ 224 px -> {T} x {D} tokens"),
        ("CPU for Ray", f"{args.num_cpus} cores (shared machine)"),
    ]
    for dtype, (report, wall) in runs.items():
        s = report["summary"]
        rows.append((f"{dtype}: job images/s (views/s)", f"{s['images_per_s']:.2f} ({s['views'] / s['seconds']:.2f})"))
        rows.append((f"{dtype}: wall incl. planning + actor start", f"{wall:.1f} s -> {args.images / wall:.2f} images/s"))
    rows += [
        ("bytes/view fp16 (file)", f"{bytes16 / views:,.0f}"),
        ("bytes/view int8 (file)", f"{bytes8 / views:,.0f}"),
        ("  of which tokens fp16 / int8 (raw)", f"{T * D * 2:,} / {T * D:,}"),
        ("  of which PNG pixels", f"{pixel_bytes / views:,.0f}"),
        ("cos(fp16, fp32) mean / min", f"{cos16.mean():.6f} / {cos16.min():.6f}"),
        ("cos(int8, fp32) mean / min", f"{cos8.mean():.6f} / {cos8.min():.6f}"),
        ("mean |cos(int8,fp32) - cos(fp16,fp32)|", f"{(cos8 - cos16).abs().mean():.2e}"),
        ("cos(int8 L2x127 draft, fp32) mean / min", f"{cos_l2.mean():.6f} / {cos_l2.min():.6f}"),
        (f"UTA loss, student proxy (cos {student_cos:.2f}): fp32", f"{losses['fp32']:.6f}"),
        ("  loss(fp16) - loss(fp32)", f"{losses['fp16'] - losses['fp32']:+.2e}"),
        ("  loss(int8) - loss(fp32)", f"{losses['int8'] - losses['fp32']:+.2e}"),
        ("  loss(int8) - loss(fp16)", f"{losses['int8'] - losses['fp16']:+.2e}"),
        ("  loss(int8 L2x127 draft) - loss(fp32)", f"{losses['int8 L2x127'] - losses['fp32']:+.2e}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

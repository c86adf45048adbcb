"""scikit-learn's digits as img2dataset-style WebDataset shards: real labelled images, offline.

The demo's data, every ``--smoke-test``'s data and the tests' data.

Each sample is ``<key>.png`` (8x8 grey digit upsampled to RGB), ``<key>.cls`` (the label),
``<key>.txt`` (a caption such as "a photo of the digit seven") and ``<key>.json``. The
split is stratified and seeded, so every machine writes the same train and held-out sets.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from uta_core.data.shards import Sample

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}.", "a photo of the number {}.", "the digit {}.")


def caption(label: int) -> str:
    return f"a photo of the digit {CLASS_NAMES[label]}"


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 RGB (M, size, size, 3) and labels (M,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    images = np.stack(
        [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")) for g in grey]
    )
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split -> (train indices, held-out indices), both sorted."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * heldout_fraction))
        heldout.extend(idx[:n_held])
        train.extend(idx[n_held:])
    return np.sort(train), np.sort(heldout)


def digit_sample(key: str, pixels_HW3: np.ndarray, label: int) -> Sample:
    buf = io.BytesIO()
    Image.fromarray(pixels_HW3).save(buf, format="PNG")
    return Sample(key=key, image=buf.getvalue(), label=label, caption=caption(label))


def digits_samples(count: int, size: int = 32, offset: int = 0) -> list[Sample]:
    """``count`` digits as PNG samples with labels and captions, keyed ``%09d`` as img2dataset does."""
    images, labels = digit_images(size)
    return [digit_sample(f"{i:09d}", images[i % len(images)], int(labels[i % len(images)]))
            for i in range(offset, offset + count)]


def webdataset_bytes(samples: Sequence[Sample], image_ext: str = "png", with_json: bool = False) -> bytes:
    """An img2dataset-style tar: ``key.<image_ext>``, ``key.cls``, ``key.txt`` (+ ``key.json``) per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            members = [(image_ext, s.image)]
            if s.label is not None:
                members.append(("cls", str(s.label).encode()))
            if s.caption is not None:
                members.append(("txt", s.caption.encode()))
            if with_json:
                members.append(("json", json.dumps({"key": s.key, "label": s.label, "caption": s.caption}).encode()))
            for ext, data in members:
                if data is not None:
                    _add_member(tar, f"{s.key}.{ext}", data)
    return buf.getvalue()


def write_shards(
    out_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    prefix: str,
    samples_per_shard: int,
    key_offset: int = 0,
) -> list[Path]:
    """Write ``<prefix>-00000.tar``... atomically (+ img2dataset's ``<prefix>-00000_stats.json``);
    keys are globally unique 9-digit strings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(images), samples_per_shard)):
        path = out_dir / f"{prefix}-{shard:05d}.tar"
        samples = [digit_sample(f"{key_offset + i:09d}", images[i], int(labels[i]))
                   for i in range(start, min(start + samples_per_shard, len(images)))]
        tmp = path.with_suffix(".tar.tmp")
        tmp.write_bytes(webdataset_bytes(samples, with_json=True))
        tmp.replace(path)
        # img2dataset's per-shard stats: what training reads to know the dataset size.
        stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0, "failed_to_resize": 0}
        (out_dir / f"{prefix}-{shard:05d}_stats.json").write_text(json.dumps(stats))
        paths.append(path)
    return paths


def write_digits_splits(
    out_dir: str | Path,
    *,
    size: int = 32,
    heldout_fraction: float = 0.2,
    samples_per_shard: int = 256,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, list[Path]]:
    """Write ``train/`` and ``heldout/`` shard folders under ``out_dir``; ``limit`` caps images."""
    images, labels = digit_images(size)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    train_idx, held_idx = split_indices(labels, heldout_fraction, seed)
    out_dir = Path(out_dir)
    return {
        "train": write_shards(
            out_dir / "train", images[train_idx], labels[train_idx], prefix="train",
            samples_per_shard=samples_per_shard,
        ),
        "heldout": write_shards(
            out_dir / "heldout", images[held_idx], labels[held_idx], prefix="heldout",
            samples_per_shard=samples_per_shard, key_offset=len(train_idx),
        ),
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))

"""``--smoke-test`` inputs of every job: real digits images and a tiny random-init CLIP, in a temp folder.

Each function writes what its job reads into ``workdir`` and returns the job's overrides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.lib.cache.config import DEFAULT_CONFIG as CACHE_DEFAULTS
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.evaluate.job import EvaluateConfig, build_classifier_file
from uta_core.config import load_config
from uta_core.data.digits import CLASS_NAMES, TEMPLATES, digits_samples, webdataset_bytes, write_digits_splits
from uta_core.models.clip import tiny_clip_config

SMOKE_ARCH = "uta-smoke-tiny"  # a random-init ViT small enough for a CPU: 32 px, patch 4 -> 8x8 grid


def _tracking(workdir: Path) -> str:
    return f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"


def tiny_teacher(workdir: Path) -> list[str]:
    """The tiny teacher's model-config JSON in ``workdir``; the ``teacher.*`` overrides that use it."""
    arch = workdir / f"{SMOKE_ARCH}.json"
    arch.write_text(json.dumps(tiny_clip_config()))
    return [f"teacher.arch={arch}", "teacher.pretrained=null", "teacher.precision=fp32", "teacher_random_seed=0"]


def prompt_overrides(prefix: str) -> list[str]:
    templates = ", ".join(f"'{t}'" for t in TEMPLATES)
    return [f"{prefix}classnames=[{', '.join(CLASS_NAMES)}]", f"{prefix}templates=[{templates}]"]


def cache_overrides(workdir: Path, shards: int = 2, per_shard: int = 12) -> list[str]:
    (workdir / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        samples = digits_samples(per_shard, size=32, offset=i * per_shard)
        (workdir / "shards" / f"{i:05d}.tar").write_bytes(webdataset_bytes(samples))
    return [
        f"input.paths={workdir / 'shards'}", f"output.path={workdir / 'cache'}", *tiny_teacher(workdir),
        "views.size=32", "num_views=2", f"ray.num_cpus={min(2, os.cpu_count() or 1)}", "ray.batch_size=32",
        _tracking(workdir),
    ]


def pretrain_overrides(workdir: Path) -> list[str]:
    """Online teacher, two workers, a few steps of a nano student."""
    write_digits_splits(workdir / "digits", size=32, limit=400)
    return [
        "data.teacher_mode=online", f"data.input.paths={workdir / 'digits' / 'train'}", "data.views.size=32",
        "student.variant=nano", "student.img_size=32", "student.patch_size=4",
        f"student.out_dim={tiny_clip_config()['embed_dim']}", *tiny_teacher(workdir),
        "train.micro_batch=16", "train.max_steps=6", "train.warmup_steps=2", "optim.lr=1e-3",
        "stream.token_rank=16", "stream.basis_views=128",  # data.teacher_mode=stream: the tiny teacher is 32-d
        "run.name=smoke", f"run.storage_path={workdir / 'runs'}", "run.log_every=2", "run.checkpoint_every=3",
        f"eval.input.paths={workdir / 'digits' / 'heldout'}", *prompt_overrides("eval."), "eval.max_images=200",
        "cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=1", _tracking(workdir),
    ]


def contrastive_overrides(workdir: Path) -> list[str]:
    """A tiny CLIP from scratch on captioned digits."""
    write_digits_splits(workdir / "digits", limit=200, samples_per_shard=64)
    clip = tiny_clip_config()
    return [
        "model.clip.name=uta-contrastive-smoke", f"model.clip.embed_dim={clip['embed_dim']}",
        f"model.clip.vision={json.dumps(clip['vision_cfg'])}", f"model.clip.text={json.dumps(clip['text_cfg'])}",
        f"data.input.paths={workdir / 'digits' / 'train'}", f"eval.input.paths={workdir / 'digits' / 'heldout'}",
        *prompt_overrides("eval."),
        "train.max_steps=6", "train.warmup_steps=2", "train.micro_batch=32", "run.log_every=2",
        f"run.storage_path={workdir / 'runs'}", "run.name=contrastive-smoke",
        f"cluster.cpus_per_worker={min(2, os.cpu_count() or 1)}", "cluster.data_cpus=1", _tracking(workdir),
    ]


def sweep_overrides(workdir: Path) -> list[str]:
    """A teacher cache and a classifier file built once; trials read the cache (no teacher)."""
    from pipelines.lib.cache.job import run as run_cache

    train = pretrain_overrides(workdir)
    teacher = [o for o in train if o.startswith(("teacher.", "teacher_random_seed"))]
    cache, classifier = workdir / "cache", workdir / "classifier.pt"
    cache_cfg = load_config(CacheConfig, CACHE_DEFAULTS, [
        f"input.paths={workdir / 'digits' / 'train'}", f"output.path={cache}", "views.size=32", "num_views=1",
        _tracking(workdir), *teacher])
    if run_cache(cache_cfg)["incomplete"]:
        raise RuntimeError("smoke test: the teacher cache left shards incomplete")
    build_classifier_file(load_config(EvaluateConfig, None, [f"output={classifier}", *teacher, *prompt_overrides("")]))
    drop = ("data.teacher_mode", "data.input", "teacher", "eval.classnames", "eval.templates")
    keep = [o for o in train if not o.startswith(drop)]
    return keep + ["data.teacher_mode=cache", f"data.cache={cache}", f"eval.classifier_path={classifier}",
                   "cluster.num_workers=1", "eval.every=2", "run.log_every=2", "train.max_steps=4"]

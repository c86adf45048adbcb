"""Tiny random-init open_clip models for tests: built in milliseconds, no downloads."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import open_clip
import torch

from uta_core.models.clip import tiny_clip_config as _library_tiny_config
from uta_core.models.teacher import Teacher
from uta_core.objectives.masking import MaskConfig, MaskGenerator

TINY_ARCH = "uta-test-tiny"


def tiny_clip_config(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, **vision: Any
) -> dict[str, Any]:
    """The library's tiny open_clip model config, with extra ``vision_cfg`` keys for refusal tests."""
    cfg = _library_tiny_config(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    cfg["vision_cfg"].update(vision)
    return cfg


def mask_gen(strategy: str, grid: tuple[int, int], mask_ratio: float, **options: Any) -> MaskGenerator:
    return MaskGenerator(MaskConfig(strategy=strategy, mask_ratio=mask_ratio, **options), grid)


def tiny_clip_model(seed: int = 0, **cfg: Any) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_clip_config(**cfg)).eval()


def tiny_clip_teacher(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 4, seed: int = 0
) -> Teacher:
    model = tiny_clip_model(seed, embed_dim=embed_dim, image_size=image_size, patch_size=patch_size)
    return Teacher(model, arch=TINY_ARCH)


def write_model_config(directory: Path, name: str = TINY_ARCH, **cfg: Any) -> Path:
    """Write a tiny config as ``<directory>/<name>.json``; pass the path as a teacher arch.

    open_clip registers configs globally by name: give a config with other sizes its own name.
    """
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_config(**cfg)))
    return path


def write_clip_benchmark_dataset(root: Path, pixels_MHW3, labels_M, classnames, templates) -> Path:
    """Labelled images as a clip_benchmark ``wds/`` dataset (its own writer, ``convert_dataset``):
    ``<root>/test/*.tar`` + classnames.txt + zeroshot_classification_templates.txt (``{c}`` style)."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
    from PIL import Image

    class Labelled(list):
        pass

    data = Labelled((Image.fromarray(p.numpy()), int(y)) for p, y in zip(pixels_MHW3, labels_M))
    data.classes, data.templates = list(classnames), [t.replace("{}", "{c}") for t in templates]
    convert_dataset(data, "test", str(root), transform=PIL_to_bytes("png"), verbose=False)
    return root


def run_clip_benchmark(model_dir: Path, dataset_root: Path, output: Path) -> dict:
    """``clip_benchmark eval`` on a local-dir open_clip model: its CLI's own ``main`` with these arguments,
    in this process (a process of its own spends ~8 s importing torch and open_clip; its CLI as a
    process of its own, as ``pipelines/benchmark.py`` runs it: tests/test_clip_tooling.py)."""
    import clip_benchmark.cli
    import clip_benchmark.metrics.zeroshot_classification as zc

    from pipelines.lib.benchmark.clip_benchmark import ACCURACY_SHIM, eval_args, needs_shim

    args = eval_args(Path(model_dir), "wds/uta", str(dataset_root), "zeroshot_classification", output,
                     ["--no_amp", "--num_workers", "0", "--batch_size", "64", "--quiet"])
    argv, accuracy = sys.argv, zc.accuracy
    try:
        if needs_shim():
            exec(ACCURACY_SHIM, {})  # replaces zc.accuracy, as the CLI's process does
        sys.argv = ["clip_benchmark", *args]
        with torch.random.fork_rng():  # it seeds the global generator
            clip_benchmark.cli.main()
    finally:
        sys.argv, zc.accuracy = argv, accuracy
    return json.loads(output.read_text())["metrics"]


def pretrain_run(tracking_uri: str, run_name: str):
    """(client, run): the one MLflow run of the pre-training run ``run_name`` (a resumed run continues it)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("uta-pretrain").experiment_id],
                              f"tags.`uta.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def write_cache_in_process(cfg) -> None:
    from uta_core.cache.writer import write_in_process

    result = write_in_process(cfg, cfg.ray.images_per_block)
    assert not result.incomplete, result.incomplete


def train_ranks(cfg, world: int, workdir: Path, fault=None, timeout: float = 300) -> list[int]:
    """``world`` ranks of a pre-training run, one process each, joined by gloo: the loop's
    collectives (cursors, the loss, checkpoint steps) for real, without Ray. Returns the exit codes.

    The ranks are forked from one server process that imported the training modules once for the
    session (multiprocessing's forkserver): a fresh interpreter per rank spent ~9 s importing them.
    Each rank takes this process's environment as it is now, not the server's."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_MODULES)
    init = f"file://{workdir / f'gloo-{uuid.uuid4().hex[:8]}'}"
    env = dict(os.environ)
    procs = [ctx.Process(target=_train_rank, args=(cfg, rank, world, init, fault, env)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(1.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s"
    return [p.exitcode for p in procs]


RANK_MODULES = ["helpers", "pipelines.lib.pretrain.job", "pipelines.lib.train.loop", "pipelines.lib.train.runtime",
                "pipelines.lib.train.launch"]


def _train_rank(cfg, rank: int, world: int, init: str, fault, env: dict[str, str]) -> None:
    import os

    os.environ.clear()
    os.environ.update(env)
    from pipelines.lib.pretrain.job import plan_pretrain
    from pipelines.lib.train.backends import InProcess
    from pipelines.lib.train.launch import resolve_paths, run_folder
    from pipelines.lib.train.loop import train_worker
    from pipelines.lib.train.runtime import LocalRuntime

    cfg = resolve_paths(cfg)
    run = run_folder(cfg)  # no lease: the ranks of one run share the folder, as Ray Train's workers do
    job, plan = plan_pretrain(cfg, run, InProcess())
    if fault is not None:
        from faults import FaultyJob

        job = FaultyJob(job, fault)
    stage = job.stage(on_pool=False)
    runtime = LocalRuntime(run, cfg.run.keep_checkpoints, rank=rank, world=world, init_method=init, threads=1,
                           timeout_s=120, stage=stage.work if stage else None)
    try:
        train_worker(job, plan, runtime, run)
    finally:
        runtime.close()


def planned(cfg):
    """(job, plan) of a pre-training config as its run would make them (in this process, no lease)."""
    from pipelines.lib.pretrain.job import plan_pretrain
    from pipelines.lib.train.backends import InProcess
    from pipelines.lib.train.launch import resolve_paths, run_folder

    cfg = resolve_paths(cfg)
    return plan_pretrain(cfg, run_folder(cfg), InProcess())


def pretrain_in_process(cfg, fault=None) -> dict:
    """A pre-training run in this process (``InProcess``), its job failing once as ``fault`` says
    (``faults.Fault``)."""
    import pytest
    from faults import faulty_plans

    from pipelines.lib.pretrain import job
    from pipelines.lib.train.backends import InProcess

    with pytest.MonkeyPatch.context() as patch:
        if fault is not None:
            patch.setattr(job, "plan_pretrain", faulty_plans(job.plan_pretrain, fault))
        return job.run(cfg, InProcess())


def pretrain_config(ws, name: str, mode: str, *extra: str, storage: str | None = None):
    """A tiny pre-training run on ``pretrain_ws``: nano student, 8-image micro-batches, one worker,
    every step logged, a checkpoint every 2 steps, every rank's rows recorded."""
    from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig
    from uta_core.config import load_config

    return load_config(PretrainConfig, DEFAULT_CONFIG, pretrain_overrides(ws, name, mode, storage) + list(extra))


def pretrain_overrides(ws, name: str, mode: str, storage: str | None = None) -> list[str]:
    """``pretrain_config``'s run as ``key=value`` overrides (for a job run as its own process)."""
    base = [
        f"run.name={name}", f"run.storage_path={storage or ws.root / 'runs'}", "run.log_every=1",
        "run.checkpoint_every=2", "run.record_samples=true", f"data.teacher_mode={mode}", "data.views.size=32",
        "student.variant=nano", "student.img_size=32", "student.patch_size=4", "student.out_dim=32",
        "train.micro_batch=8", "train.warmup_steps=1", "optim.lr=2e-3", "cluster.num_workers=1",
        "cluster.cpus_per_worker=1", f"eval.input.paths={ws.heldout}", f"eval.classifier_path={ws.classifier}",
        "eval.max_images=40", f"eval.retrieval_input.paths={ws.heldout}", f"tracking.tracking_uri={ws.mlflow}",
    ]
    if mode in ("online", "stream"):
        base += [f"data.input.paths={ws.train}", f"teacher.arch={ws.arch}", f"teacher.pretrained={ws.weights}",
                 "teacher.precision=fp32"]
    else:
        base += [f"data.cache={ws.cache}", "teacher.arch=no-such-open-clip-model"]  # cache mode never builds it
    return base


def samples_seen(storage: str, name: str, rank: int = 0, epoch: int = 0, s3=None) -> list[int]:
    """The ids rank ``rank`` trained on in ``epoch``, in order: its record files in step order."""
    from pyarrow.fs import FileSelector

    from uta_core.data.storage import S3Options, filesystem_for, read_bytes

    fs, root = filesystem_for(f"{storage}/{name}/samples", s3 or S3Options())
    prefix = f"rank{rank}-epoch{epoch:04d}-from"
    names = sorted(i.base_name for i in fs.get_file_info(FileSelector(root)) if i.base_name.startswith(prefix))
    assert names, f"no samples recorded for rank {rank}, epoch {epoch} of {name}"
    return [int(x) for n in names for x in read_bytes(fs, f"{root}/{n}").decode().split()]


def checkpoint_state(storage: str, name: str, step: int, s3=None) -> dict:
    """The verified state of a run's checkpoint (as a resume reads it)."""
    from uta_core.data.storage import S3Options
    from uta_core.run.folder import RunFolder

    return RunFolder(f"{storage}/{name}", s3 or S3Options()).load_checkpoint(step)


def upload_tree(s3_client, bucket: str, prefix: str, folder: Path) -> None:
    """Every file under ``folder`` to ``s3://bucket/prefix/<relative path>``."""
    for path in folder.rglob("*"):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())

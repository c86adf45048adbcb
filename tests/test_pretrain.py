"""The pre-training job end to end on a real local Ray: 2 CPU workers, both teacher modes,
resume, online/cache equivalence of the loss (`ray job submit`: tests/test_cluster_configs.py).

Tiny settings: 32 px digits views, patch 4 (8x8 grid), a nano student, a tiny open_clip
teacher whose weights live in a file (so the cache job, the workers and the references
all load the same teacher).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector
import pytest
import torch
from conftest import FAKE_AWS_ENV
from helpers import tiny_clip_model, write_model_config

from pipelines.evaluate import main as evaluate_main
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cache.job import run as run_cache
from pipelines.lib.evaluate.job import EvaluateConfig, evaluate
from pipelines.lib.pretrain.config import DEFAULT_CONFIG, PretrainConfig
from pipelines.lib.pretrain.data import (
    EpochStream,
    Sources,
    cache_sources,
    check_sources,
    online_sources,
    teacher_description,
)
from pipelines.lib.train.trainer import make_plan
from pipelines.pretrain import main
from uta_core.cache.format import load_codec, open_cache
from uta_core.config import load_config
from uta_core.data.epochs import Cursor
from uta_core.data.digits import CLASS_NAMES, write_digits_splits
from uta_core.models.export import load_student
from helpers import mask_gen
from uta_core.data.shards import InputConfig, discover, iter_samples
from uta_core.data.storage import S3Options, filesystem_for, read_bytes
from uta_core.models.student import build_student
from uta_core.models.open_clip_export import load_open_clip
from uta_core.models.teacher import Teacher, build_teacher
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, draw_keep, step_loss
from uta_core.optim import lr_at
from uta_core.data.rows import TeacherTargets, cache_rows, online_rows, sample_id

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
TEACHER_NAME = "uta-pretrain-tiny"  # 32 px, patch 4 -> 8x8 grid, D = 32
NUM_VIEWS = 2  # cached views per image


# --------------------------------------------------------------------- shared workspace
@pytest.fixture(scope="module")
def ws(ray_local, tmp_path_factory):
    """Digits shards, teacher files, a teacher cache (by the cache job) and a classifier file."""
    root = tmp_path_factory.mktemp("pretrain")
    write_digits_splits(root / "digits", size=32, heldout_fraction=0.25, samples_per_shard=32, limit=160)
    arch = write_model_config(root, name=TEACHER_NAME)
    weights = root / "teacher.pt"
    torch.save(tiny_clip_model(seed=0).state_dict(), weights)
    cache = root / "cache"
    run_cache(load_config(CacheConfig, None, [
        f"input.paths={root / 'digits' / 'train'}", f"output.path={cache}", f"teacher.arch={arch}",
        f"teacher.pretrained={weights}", "teacher.precision=fp32", "views.size=32", f"num_views={NUM_VIEWS}",
        "ray.batch_size=32", "ray.progress_bars=false", "tracking.enabled=false",
        "output.pixel_format=png",  # lossless: the cache's pixels equal the online views (compared below)
    ]))
    classifier = root / "classifier.pt"
    assert evaluate_main(["build-classifier", f"teacher.arch={arch}", f"teacher.pretrained={weights}",
                          f"classnames=[{', '.join(CLASS_NAMES)}]", "templates=['a photo of the digit {}.']",
                          f"retrieval_input.paths={root / 'digits' / 'heldout'}", f"output={classifier}"]) == 0
    train_cfg = InputConfig(paths=[str(root / "digits" / "train")])
    inputs = discover(train_cfg, S3Options())
    train_keys = [s.key for shard in inputs.shards for s in iter_samples(inputs.fs, shard, train_cfg)]
    assert len(train_keys) == 120  # 160 digits, a quarter held out
    return SimpleNamespace(root=root, train=root / "digits" / "train", heldout=root / "digits" / "heldout",
                           arch=str(arch), weights=str(weights), cache=cache, classifier=classifier,
                           train_keys=train_keys, mlflow=f"sqlite:///{root / 'mlflow.db'}")


def overrides(ws, name: str, mode: str, *extra: str) -> list[str]:
    base = [
        f"run.name={name}", f"run.storage_path={ws.root / 'runs'}", "run.log_every=1", "run.checkpoint_every=100",
        f"data.teacher_mode={mode}", "data.views.size=32", "data.num_views=1",
        "student.variant=nano", "student.img_size=32", "student.patch_size=4", "student.out_dim=32",
        "train.micro_batch=8", "train.warmup_steps=1", "optim.lr=2e-3",
        "cluster.num_workers=2", "cluster.cpus_per_worker=0.5",
        f"eval.input.paths={ws.heldout}", f"eval.classifier_path={ws.classifier}", "eval.max_images=40",
        f"eval.retrieval_input.paths={ws.heldout}",
        f"tracking.tracking_uri={ws.mlflow}",
    ]
    if mode == "online":
        base += [f"data.input.paths={ws.train}", f"teacher.arch={ws.arch}", f"teacher.pretrained={ws.weights}",
                 "teacher.precision=fp32"]
    else:
        # A teacher that cannot be built: cache mode must never try.
        base += [f"data.cache={ws.cache}", "teacher.arch=no-such-open-clip-model"]
    return ["--config", str(DEFAULT_CONFIG), *base, *extra]


def mlflow_run(ws, name: str):
    client = mlflow.tracking.MlflowClient(ws.mlflow)
    exp = client.get_experiment_by_name("uta-pretrain")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`uta.run_name` = '{name}'")
    return client, run


def read(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = filesystem_for(uri, S3Options(endpoint_url=endpoint))
    data = read_bytes(fs, path)
    assert data is not None, f"{uri} does not exist"
    return data


def state(ws, name: str, step: int, storage: str | None = None, endpoint: str | None = None) -> dict:
    uri = f"{storage or ws.root / 'runs'}/{name}/checkpoint_{step:07d}/state.pt"
    return torch.load(io.BytesIO(read(uri, endpoint)), weights_only=False)


def seen_ids(ws, name: str, rank: int, storage: str | None = None, endpoint: str | None = None,
             epoch: int = 0) -> list[int]:
    """The ids rank ``rank`` trained on in ``epoch``, in order: its record files in step order."""
    fs, root = filesystem_for(f"{storage or ws.root / 'runs'}/{name}/samples", S3Options(endpoint_url=endpoint))
    prefix = f"rank{rank}-epoch{epoch:04d}-from"
    names = sorted(i.base_name for i in fs.get_file_info(FileSelector(root)) if i.base_name.startswith(prefix))
    assert names, f"no samples recorded for rank {rank}, epoch {epoch} of {name}"
    return [int(x) for n in names for x in read_bytes(fs, f"{root}/{n}").decode().split()]


# --------------------------------------------------------------------- two workers, both modes, resume
@pytest.mark.timeout(500)
def test_online_two_workers_stop_resume_learn_on_disjoint_data_and_track_everything(ws):
    # 120 images / 2 ranks = 60 rows each -> 7 micro-batches of 8: 7 steps = one epoch.
    args = overrides(ws, "online", "online", "train.max_steps=7", "run.record_samples=true",
                     "run.checkpoint_every=2", "run.max_failures=0", "tracking.register_as=uta-test-online")
    assert main(args + ["fail_at_step=3"]) == 1  # stopped after step 3; the last checkpoint is step 2
    run_dir = ws.root / "runs" / "online"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_0000002"]
    assert state(ws, "online", 2)["position"]["step"] == 2

    assert main(args) == 0  # the same run name again: it resumes
    final = state(ws, "online", 7)
    assert final["position"]["step"] == 7 and final["scheduler"]["last_epoch"] == 7
    # AdamW counts its own steps: 7 only if the optimiser state saved at step 2 was loaded.
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {7}
    client, run = mlflow_run(ws, "online")  # one MLflow run, continued
    assert run.data.tags["uta.resumed_from_step"] == "2" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "pipelines/pretrain.py"  # not Ray's default_worker.py
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in history] == [1, 2, 3, 3, 4, 5, 6, 7]  # step 3 before the stop and after the resume
    assert history[-1].value < history[0].value - 0.1, [m.value for m in history]
    for m in client.get_metric_history(run.info.run_id, "lr"):  # the schedule the optimiser used
        assert m.value == pytest.approx(lr_at(m.step - 1, base_lr=2e-3, min_lr=1e-5, warmup_steps=1, total_steps=7))

    # Each checkpoint records the rows since the last: steps 1-2 by the stopped attempt, 3-7 by the
    # resumed one, which started right after the checkpoint's rows: 7 x 8 rows per rank, none twice.
    for rank in (0, 1):
        names = sorted(p.name for p in (run_dir / "samples").glob(f"rank{rank}-*"))
        assert names == [f"rank{rank}-epoch0000-from{s:07d}.txt" for s in (0, 2, 4, 6)]
    rank0, rank1 = seen_ids(ws, "online", 0), seen_ids(ws, "online", 1)
    assert len(rank0) == len(set(rank0)) == len(rank1) == len(set(rank1)) == 56 and not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) <= {sample_id(k, 0) for k in ws.train_keys}

    params = run.data.params
    assert params["student.variant"] == "nano" and params["data.teacher_mode"] == "online"
    assert params["plan.total_steps"] == "7" and params["plan.steps_per_epoch"] == "7"
    assert not any(FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"] in v for v in params.values())
    for key in ("loss", "lr", "images_per_s", "tokens_per_s", "zeroshot_top1", "zeroshot_top5",
                "retrieval_i2t_r1", "retrieval_t2i_r5", "retrieval_t2i_r10"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"masking_probability.png", "loss_curve.png", "config.yaml", "student"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "student")} >= {
        "student/model.safetensors", "student/config.json", "student/head.safetensors"}

    # The export is the final checkpoint's student; open_clip loads it as a CLIP with the teacher's
    # text tower; MLflow holds it as a model.
    final = state(ws, "online", 7)
    exported, meta = load_student(ws.root / "runs" / "online" / "export")
    for k, v in exported.state_dict().items():
        if k != "mask_token":  # MIM-only, not part of an export
            torch.testing.assert_close(v, final["model"][k], msg=k)
    assert meta["step"] == 7 and final["position"]["step"] == 7
    clip, _, tokenizer = load_open_clip(ws.root / "runs" / "online" / "export")
    teacher = Teacher.from_open_clip(ws.arch, ws.weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), exported(x)[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(tokenizer(["the digit four."])),
                                   teacher.encode_text(["the digit four."]), atol=1e-5, rtol=1e-5)
        mlflow.set_tracking_uri(ws.mlflow)
        logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/student_model")
        (version,) = client.search_model_versions("name='uta-test-online'")  # tracking.register_as
        assert version.run_id == run.info.run_id
        pixels = torch.rand(2, 3, 32, 32)
        normed = (pixels - torch.tensor(meta["mean"])[:, None, None]) / torch.tensor(meta["std"])[:, None, None]
        torch.testing.assert_close(logged(pixels), exported(normed)[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(400)
def test_cache_on_s3_two_workers_learn_without_a_teacher_and_survive_a_sigkilled_worker(
    ws, s3_server, s3_client, s3_bucket
):
    # Cache, checkpoints, samples and export all on S3 (moto); no teacher can be built here.
    for path in ws.cache.rglob("*"):
        if path.is_file():
            s3_client.put_object(Bucket=s3_bucket, Key=f"cache/{path.relative_to(ws.cache)}", Body=path.read_bytes())
    storage = f"s3://{s3_bucket}/runs"
    # Rank 0's process SIGKILLs itself after step 3 (checkpoint at 2, on S3); FailureConfig(max_failures=1)
    # restarts the group, which resumes from the newest checkpoint in the run folder.
    args = overrides(ws, "cache", "cache", "train.max_steps=6", "run.record_samples=true",
                     "run.checkpoint_every=2", "run.max_failures=1", "fail_at_step=3", "fail_with_sigkill=true",
                     f"data.cache=s3://{s3_bucket}/cache", f"run.storage_path={storage}",
                     f"s3.endpoint_url={s3_server}")
    assert main(args) == 0
    client, run = mlflow_run(ws, "cache")
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 3, 4, 5, 6]  # step 3 again after the restart
    assert history[-1].value < history[0].value - 0.1, [m.value for m in history]
    assert run.data.tags["uta.resumed_from_step"] == "2" and run.info.status == "FINISHED"
    final = state(ws, "cache", 6, storage, s3_server)  # AdamW counts its steps: 6 only if step 2's state came back
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {6}
    # data.cache_views=cycle: epoch 0 trains on stored view 0 of each of the 120 images: 7 steps an
    # epoch, so all 6 steps stay inside epoch 0.
    assert run.data.params["plan.steps_per_epoch"] == "7"
    assert run.data.params["plan.teacher.arch"] == ws.arch  # provenance: the cache's teacher, not the config's
    killed = [seen_ids(ws, "cache", rank, storage, s3_server) for rank in (0, 1)]
    # The same run, never killed: the restarted group trained on exactly the rows it would have.
    straight = overrides(ws, "cache-straight", "cache", "train.max_steps=6", "run.record_samples=true",
                         "run.checkpoint_every=2")
    assert main(straight) == 0
    assert killed == [seen_ids(ws, "cache-straight", rank) for rank in (0, 1)]
    assert len(killed[0]) == len(set(killed[0])) == 48 and not set(killed[0]) & set(killed[1])
    assert set(killed[0]) | set(killed[1]) <= {sample_id(k, 0) for k in ws.train_keys}
    assert "zeroshot_top1" in run.data.metrics
    # The classifier file is what made zero-shot possible: evaluate.py agrees on the S3 export.
    out = evaluate(load_config(EvaluateConfig, None, [
        f"model={storage}/cache", f"input.paths={ws.heldout}", f"classifier_path={ws.classifier}",
        f"retrieval_input.paths={ws.heldout}", "max_images=40", "tracking.enabled=false",
        f"s3.endpoint_url={s3_server}"]))
    assert out["step"] == 6 and out["zeroshot_top1"] == pytest.approx(run.data.metrics["zeroshot_top1"])
    for key in ("retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_t2i_r5"):  # from the file's caption embeddings
        assert out[key] == pytest.approx(run.data.metrics[key]), key
    # Cache mode builds no teacher to train, but the export's open_clip CLIP gets the cache's text tower.
    exported = read(f"{storage}/cache/export/open_clip_model.safetensors", s3_server)
    assert b"text_projection" in exported


@pytest.mark.parametrize("extra,message", [
    ("student.patch_size=8", "8x8 grid but the student's grid is 4x4"),
    ("student.out_dim=64", "set student.out_dim=32"),
])
def test_cache_mode_refuses_a_cache_that_does_not_fit_the_student(ws, capsys, extra, message):
    assert main(overrides(ws, "refused", "cache", extra)) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------- driver-side planning
def test_start_up_reads_the_producers_stats_files_and_never_a_shard(ws, s3_server, s3_client, s3_bucket,
                                                                     monkeypatch):
    from moto.s3.models import S3Backend

    for path in ws.train.iterdir():
        s3_client.put_object(Bucket=s3_bucket, Key=f"train/{path.name}", Body=path.read_bytes())
    read_keys: list[str] = []  # every object body the (in-process) S3 server hands out
    get_object = S3Backend.get_object
    monkeypatch.setattr(S3Backend, "get_object",
                        lambda self, bucket, key, *a, **k: read_keys.append(key) or get_object(self, bucket, key, *a, **k))
    args = overrides(ws, "startup", "online", f"data.input.paths=s3://{s3_bucket}/train",
                     f"s3.endpoint_url={s3_server}")[2:]
    sources = online_sources(load_config(PretrainConfig, DEFAULT_CONFIG, args))
    assert sources.rows == [32, 32, 32, 24] and sources.counted_from == "img2dataset *_stats.json"
    assert {f"train/{p.name}" for p in ws.train.glob("*_stats.json")} <= set(read_keys)
    assert not [k for k in read_keys if k.endswith(".tar")]

    for path in ws.train.glob("*_stats.json"):  # no producer stats: ask, do not count
        s3_client.delete_object(Bucket=s3_bucket, Key=f"train/{path.name}")
    read_keys.clear()
    with pytest.raises(ValueError, match="set data.num_samples"):
        online_sources(load_config(PretrainConfig, DEFAULT_CONFIG, args))
    sources = online_sources(load_config(PretrainConfig, DEFAULT_CONFIG, args + ["data.num_samples=120"]))
    assert sources.rows == [30, 30, 30, 30] and not [k for k in read_keys if k.endswith(".tar")]



def test_plan_gives_every_rank_whole_steps_and_refuses_too_little_data(ws):
    args = overrides(ws, "plan", "online", "train.global_batch=32", "train.epochs=2", "train.warmup_epochs=1",
                     "train.warmup_steps=null")[2:]
    cfg = load_config(PretrainConfig, DEFAULT_CONFIG, args)
    plan = make_plan(cfg.train, cfg.cluster, 120, "unused", teacher=teacher_description(cfg))
    # 60 rows a rank -> 7 micro-batches of 8 -> 3 steps of 2 accumulated micro-batches (x 2 ranks = 32 rows).
    assert (plan.accumulation, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (2, 3, 6, 3)
    assert plan.teacher["arch"] == ws.arch
    with pytest.raises(ValueError, match="fewer than one step"):
        make_plan(cfg.train, cfg.cluster, 30, "unused")  # 15 rows a rank: one micro-batch, not 2
    # Each rank reads its own shards: every rank needs one, and a whole step's rows.
    with pytest.raises(ValueError, match="1 input shard"):
        check_sources(Sources(kind="online", items=["s"], rows=[120]), cfg)
    with pytest.raises(ValueError, match="less than one step"):  # the rank without the big shard: 2 rows
        check_sources(Sources(kind="online", items=["a", "b", "c", "d"], rows=[100, 1, 1, 1]), cfg)
    check_sources(Sources(kind="online", items=["a", "b", "c", "d"], rows=[30, 30, 30, 30]), cfg)


def test_online_mode_refuses_a_teacher_grid_or_dim_that_does_not_fit_before_any_worker(ws, capsys):
    assert main(overrides(ws, "refused", "online", "student.patch_size=8")) == 2
    assert "set student.patch_size=4" in capsys.readouterr().err
    assert main(overrides(ws, "refused", "online", "student.out_dim=16")) == 2
    assert "set student.out_dim=32" in capsys.readouterr().err


# --------------------------------------------------------------------- online == cache
@pytest.mark.parametrize("objective", ["uta", "fd", "mim"])
def test_online_and_cache_give_the_same_loss_on_the_same_batch(ws, objective):
    cfg = load_config(PretrainConfig, DEFAULT_CONFIG, overrides(ws, "x", "online")[2:])
    # Cache rows, as the cache-mode dataset maps them.
    fs, root, manifest, paths = open_cache(str(ws.cache))
    table = pq.read_table(paths[0], filesystem=fs, columns=["key", "view", "pixels", "tokens", "label"])
    cached = cache_rows({c: table.column(c) for c in table.column_names})
    # Online rows of the same source shard, with the cache's views.
    shard = discover(cfg.data.input, cfg.s3).shards[0]
    assert manifest.shards[Path(paths[0]).parent.name].source == shard.uri
    online = [b for b in online_rows(shard, cfg.data.input, cfg.data.views, NUM_VIEWS, cfg.s3)]
    online = {k: np.concatenate([b[k] for b in online]) for k in online[0]}
    order = {int(i): n for n, i in enumerate(online["sample_id"])}
    pick = [order[int(i)] for i in cached["sample_id"][:12]]
    np.testing.assert_array_equal(online["image"][pick], cached["image"][:12])  # the same pixels

    teacher_cfg = dataclasses.replace(cfg.teacher, image_size=cfg.student.img_size)
    teacher = build_teacher(teacher_cfg, random_seed=cfg.teacher_random_seed)  # what an online worker builds
    device = torch.device("cpu")
    images_on, teacher_on = TeacherTargets(teacher.mean, teacher.std, teacher)(
        {"image": torch.from_numpy(online["image"][pick])}, device)
    mean, std = manifest.settings.teacher["mean"], manifest.settings.teacher["std"]
    images_ca, teacher_ca = TeacherTargets(tuple(mean), tuple(std), codec=load_codec(fs, root, manifest))(
        {"image": torch.from_numpy(cached["image"][:12]), "tokens": torch.from_numpy(cached["tokens"][:12])}, device)
    torch.testing.assert_close(images_on, images_ca, rtol=0, atol=0)

    torch.manual_seed(0)
    student = build_student("nano", img_size=32, patch_size=4, out_dim=32).eval()
    obj = ObjectiveConfig(name=objective)
    keep = draw_keep(mask_gen("block_reversed", (8, 8), 0.5), 12, seed=0, rank=0, step=0)
    with torch.no_grad():
        loss_on = step_loss(StudentForward(student, obj), images_on, teacher_on, keep, obj).item()
        loss_ca = step_loss(StudentForward(student, obj), images_ca, teacher_ca, keep, obj).item()
    assert loss_on == pytest.approx(loss_ca, abs=1e-3)  # fp16 storage of the tokens
    other = torch.roll(teacher_ca, 1, dims=0)  # and the check can tell batches apart
    with torch.no_grad():
        assert abs(step_loss(StudentForward(student, obj), images_ca, other, keep, obj).item() - loss_on) > 1e-3


@pytest.mark.timeout(300)
def test_a_cache_without_pixels_trains_on_views_rebuilt_from_its_inputs(ws, tmp_path):
    """``output.pixel_format=none``: the rank's stream rebuilds every view from the input shard,
    bit for bit the pixels of the lossless (PNG) cache of the same inputs and views."""
    out = tmp_path / "cache-none"
    run_cache(load_config(CacheConfig, None, [
        f"input.paths={ws.train}", f"output.path={out}", f"teacher.arch={ws.arch}",
        f"teacher.pretrained={ws.weights}", "teacher.precision=fp32", "views.size=32", f"num_views={NUM_VIEWS}",
        "ray.batch_size=32", "ray.progress_bars=false", "tracking.enabled=false", "output.pixel_format=none",
    ]))
    fs, _, manifest, paths = open_cache(str(out))
    assert manifest.settings.pixel_format == "none"
    assert all(len(v) == 0 for p in paths for v in pq.read_table(p, columns=["pixels"]).column(0).to_pylist())
    # The PNG cache of the same inputs: the pixels the rebuilt views must equal.
    png_fs, _, _, png_paths = open_cache(str(ws.cache))
    stored = {}
    for p in png_paths:
        rows = cache_rows({c: col for c, col in zip(["key", "view", "pixels", "tokens", "label"], pq.read_table(
            p, filesystem=png_fs, columns=["key", "view", "pixels", "tokens", "label"]).columns)})
        stored.update(zip(rows["sample_id"].tolist(), rows["image"]))

    cfg = load_config(PretrainConfig, DEFAULT_CONFIG, [*overrides(ws, "none", "cache")[2:], f"data.cache={out}",
                                                       "data.cache_views=all"])
    sources, _, _ = cache_sources(cfg)
    assert sources.view_sources and len(sources.view_sources) == len(sources.items)
    stream = EpochStream(cfg, sources, rank=0, world=1, rows_per_step=8)
    seen = set()
    for batch, _ in itertools.islice(stream.batches(0, Cursor()), stream.steps(0)):  # the epoch's steps
        for sid, image in zip(batch["sample_id"].tolist(), batch["image"]):
            np.testing.assert_array_equal(image, stored[sid])
            seen.add(sid)
    assert len(seen) == stream.steps(0) * 8 >= sources.total_rows - 8 * len(sources.items)
    # An input that changed under the cache is named, with what to do.
    names = sorted(manifest.shards)
    first, second = (Path(manifest.shards[n].input_shard["path"]) for n in names[:2])
    original = first.read_bytes()
    first.write_bytes(second.read_bytes())  # other samples under the first shard's name
    try:
        with pytest.raises(Exception, match="rebuilds its views from its input shards"):
            for _ in itertools.islice(stream.batches(0, Cursor()), stream.steps(0)):
                pass
    finally:
        first.write_bytes(original)

"""The pre-training job: what a run tracks and exports, the driver's refusals and plan, the two
teacher modes' equal targets, and one end-to-end run on a real local Ray (2 workers, cache and
checkpoints on S3, a SIGKILLed worker) that trains exactly the rows of the same run without Ray.
(Resume and cursors in depth: tests/test_loop.py; `ray job submit`: tests/test_cluster_configs.py.)

Tiny settings (``pretrain_ws`` in conftest.py): 32 px digits views, patch 4 (8x8 grid), a nano
student, a tiny open_clip teacher whose weights live in a file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_AWS_ENV
from faults import Fault, faulty_plans
from helpers import (
    checkpoint_state,
    mask_gen,
    pretrain_config,
    pretrain_run,
    samples_seen,
    train_ranks,
    upload_tree,
    write_cache_in_process,
)

from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.evaluate.job import EvaluateConfig, evaluate
from pipelines.lib.pretrain import job as pretrain_job
from pipelines.lib.pretrain.job import run
from pipelines.lib.pretrain.targets import target_source
from pipelines.lib.train.backends import InProcess
from pipelines.lib.train.plan import make_plan
from pipelines.pretrain import main
from uta_core.cache.format import open_cache
from uta_core.cache.reader import cache_rows
from uta_core.config import load_config
from uta_core.data.epochs import Cursor, Sources
from uta_core.data.rows import sample_id
from uta_core.data.shards import InputConfig, discover, iter_samples
from uta_core.data.storage import S3Options
from uta_core.data.stream import EpochStream, serial_read
from uta_core.models.open_clip_export import load_open_clip
from uta_core.models.student import build_student
from uta_core.models.teacher import Teacher
from uta_core.models.trained import load_export
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, draw_keep, step_loss


def train_keys(ws) -> list[str]:
    cfg = InputConfig(paths=[str(ws.train)])
    inputs = discover(cfg, S3Options())
    return [s.key for shard in inputs.shards for s in iter_samples(inputs.fs, shard, cfg)]


# --------------------------------------------------------------------- what a run leaves
def test_a_run_tracks_everything_and_its_export_loads_in_timm_open_clip_and_mlflow(pretrain_ws, monkeypatch):
    ws = pretrain_ws
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a sample within this short run
    cfg = pretrain_config(ws, "tracked", "online", "train.max_steps=8", "tracking.register_as=uta-test-online")
    run(cfg, InProcess())
    client, mlrun = pretrain_run(ws.mlflow, "tracked")
    # Its data as MLflow datasets: what it trained on (the shards, digest of their listing) and evaluated on.
    inputs = {d.dataset.name: d for d in mlrun.inputs.dataset_inputs}
    train = inputs["image shards"]
    tags = {t.key: t.value for t in train.tags}
    assert tags["mlflow.data.context"] == "training" and tags["sources"] == "4" and tags["rows_per_epoch"] == "120"
    assert str(ws.train) in train.dataset.source and len(train.dataset.digest) == 16
    assert {t.key: t.value for t in inputs["eval.input"].tags}["mlflow.data.context"] == "evaluation"
    assert any(k.startswith("system/cpu_utilization") for k in mlrun.data.metrics), sorted(mlrun.data.metrics)
    history = sorted(client.get_metric_history(mlrun.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9)) and mlrun.info.status == "FINISHED"
    assert history[-1].value < history[0].value - 0.05, [m.value for m in history]
    assert mlrun.data.tags["mlflow.source.name"] == "pipelines/pretrain.py" and mlrun.data.tags["job"] == "pretrain"
    params = mlrun.data.params
    assert params["student.variant"] == "nano" and params["data.teacher_mode"] == "online"
    assert params["plan.total_steps"] == "8" and params["plan.sources.rows"] == "120"
    assert params["targets.teacher.arch"] == ws.arch  # provenance of the tokens learnt
    assert not any(FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"] in v for v in params.values())
    for key in ("loss", "lr", "images_per_s", "tokens_per_s", "grad_norm", "zeroshot_top1", "zeroshot_top5",
                "retrieval_i2t_r1", "retrieval_t2i_r5", "retrieval_t2i_r10"):
        assert key in mlrun.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"masking_probability.png", "loss_curve.png", "config.yaml", "student"} <= artifacts
    # The export is the final checkpoint's student; open_clip loads it as a CLIP with the teacher's
    # text tower; MLflow holds it as a registered model.
    final = checkpoint_state(str(ws.root / "runs"), "tracked", 8)
    export = ws.root / "runs" / "tracked" / "export"
    exported, meta = load_export(export)
    for k, v in exported.state_dict().items():
        if k != "mask_token":  # MIM-only, not part of an export
            torch.testing.assert_close(v, final["model"][k], msg=k)
    assert meta["step"] == 8 and final["meta"]["teacher"]["arch"] == ws.arch
    clip, _, tokenizer = load_open_clip(export)
    teacher = Teacher.from_open_clip(ws.arch, ws.weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), exported(x)[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(tokenizer(["the digit four."])),
                                   teacher.encode_text(["the digit four."]), atol=1e-5, rtol=1e-5)
        mlflow.set_tracking_uri(ws.mlflow)
        logged = mlflow.pytorch.load_model(f"runs:/{mlrun.info.run_id}/student_model")
        (version,) = client.search_model_versions("name='uta-test-online'")  # tracking.register_as
        assert version.run_id == mlrun.info.run_id
        pixels = torch.rand(2, 3, 32, 32)
        normed = (pixels - torch.tensor(meta["mean"])[:, None, None]) / torch.tensor(meta["std"])[:, None, None]
        torch.testing.assert_close(logged(pixels), exported(normed)[:, 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- the driver: refusals, plan
@pytest.mark.parametrize("extra,message", [
    ("student.patch_size=8", "8x8 grid of 32 px views but the student's grid is 4x4 (img_size 32, patch 8); set "
                             "student.patch_size=4, or rebuild"),
    # the patch is right and the image size is not: the fix names the image size, not the patch
    ("student.img_size=224", "but the student's grid is 56x56 (img_size 224, patch 4); set student.img_size=32, or"),
    ("student.out_dim=64", "set student.out_dim=32"),
])
def test_cache_mode_refuses_a_cache_that_does_not_fit_the_student(pretrain_ws, capsys, extra, message):
    args = [f"{k}={v}" for k, v in [("data.teacher_mode", "cache"), ("data.cache", pretrain_ws.cache)]]
    assert main(["student.img_size=32", "student.patch_size=4", "student.out_dim=32", *args, extra,
                 "teacher.arch=no-such-model"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_online_mode_refuses_a_teacher_grid_or_dim_that_does_not_fit_before_any_worker(pretrain_ws, capsys):
    base = ["data.teacher_mode=online", f"data.input.paths={pretrain_ws.train}", "data.views.size=32",
            "student.img_size=32", f"teacher.arch={pretrain_ws.arch}", f"teacher.pretrained={pretrain_ws.weights}"]
    assert main([*base, "student.patch_size=8", "student.out_dim=32"]) == 2
    assert "set student.patch_size=4" in capsys.readouterr().err
    assert main([*base, "student.patch_size=4", "student.out_dim=16"]) == 2
    assert "set student.out_dim=32" in capsys.readouterr().err


def test_start_up_reads_the_producers_stats_files_and_never_a_shard(pretrain_ws, s3_server, s3_client, s3_bucket,
                                                                     monkeypatch):
    from moto.s3.models import S3Backend

    for path in pretrain_ws.train.iterdir():
        s3_client.put_object(Bucket=s3_bucket, Key=f"train/{path.name}", Body=path.read_bytes())
    read_keys: list[str] = []  # every object body the (in-process) S3 server hands out
    get_object = S3Backend.get_object
    def recorded(self, bucket, key, *a, **k):
        read_keys.append(key)
        return get_object(self, bucket, key, *a, **k)

    monkeypatch.setattr(S3Backend, "get_object", recorded)
    args = [f"data.input.paths=s3://{s3_bucket}/train", f"s3.endpoint_url={s3_server}"]
    sources = target_source(pretrain_config(pretrain_ws, "startup", "online", *args)).plan().sources
    assert sources.rows == [32, 32, 32, 24] and sources.counted_from == "img2dataset *_stats.json"
    assert {f"train/{p.name}" for p in pretrain_ws.train.glob("*_stats.json")} <= set(read_keys)
    assert not [k for k in read_keys if k.endswith(".tar")]

    for path in pretrain_ws.train.glob("*_stats.json"):  # no producer stats: ask, do not count
        s3_client.delete_object(Bucket=s3_bucket, Key=f"train/{path.name}")
    read_keys.clear()
    with pytest.raises(ValueError, match="set data.num_samples"):
        target_source(pretrain_config(pretrain_ws, "startup", "online", *args)).plan()
    cfg = pretrain_config(pretrain_ws, "startup", "online", *args, "data.num_samples=120")
    sources = target_source(cfg).plan().sources
    assert sources.rows == [30, 30, 30, 30] and not [k for k in read_keys if k.endswith(".tar")]


def test_plan_gives_every_rank_whole_steps_and_refuses_too_little_data(pretrain_ws):
    cfg = pretrain_config(pretrain_ws, "plan", "online", "cluster.num_workers=2", "train.global_batch=32",
                          "train.epochs=2", "train.warmup_epochs=1", "train.warmup_steps=null")
    sources = target_source(cfg).plan().sources  # 4 shards of 32, 32, 32, 24 rows

    def plan(rows, items=None):
        items = items or [f"s{i}" for i in range(len(rows))]
        return make_plan(cfg.train, cfg.cluster, Sources(items=items, rows=rows, counted_from="test"), 0, False, "x")

    # Ranks read 2 shards each (56 or 64 rows); the smaller rank's 56 rows give 3 steps of 2 micro-batches of 8.
    p = make_plan(cfg.train, cfg.cluster, sources, cfg.run.seed, cfg.data.shuffle_files, "x")
    assert (p.accumulation, p.steps_per_epoch, p.total_steps, p.warmup_steps) == (2, 3, 6, 3)
    with pytest.raises(ValueError, match="1 input shard"):  # each rank reads its own shards
        plan([120])
    with pytest.raises(ValueError, match="less than one step"):  # the rank without the big shard: 2 rows
        plan([100, 1, 1, 1])
    assert plan([30, 30, 30, 30]).steps_per_epoch == 3


# --------------------------------------------------------------------- online == cache
@pytest.mark.parametrize("objective", ["uta", "fd", "mim"])
def test_online_and_cache_give_the_same_images_targets_and_loss_on_the_same_rows(pretrain_ws, objective):
    online_cfg = pretrain_config(pretrain_ws, "x", "online", "data.num_views=2")
    cache_cfg = pretrain_config(pretrain_ws, "x", "cache", "data.cache_views=all")
    online, cached = target_source(online_cfg), target_source(cache_cfg)
    # The same first source read by each mode's reader, epoch 0 (the cache job's views).
    cache_part = cached.plan().sources.items[0]
    rows_ca = next(iter(cached.reader(0)(cache_part, 0, 0)))
    fs, root, manifest, _ = open_cache(str(pretrain_ws.cache))
    shard = next(s for s in online.plan().sources.items
                 if s.uri == manifest.shards[Path(cache_part.path).parent.name].source)
    rows_on = {k: np.concatenate([b[k] for b in online.reader(0)(shard, 0, 0)]) for k in ("image", "sample_id")}
    order = {int(i): n for n, i in enumerate(rows_on["sample_id"])}
    pick = [order[int(i)] for i in rows_ca["sample_id"][:12]]
    np.testing.assert_array_equal(rows_on["image"][pick], rows_ca["image"][:12])  # the same pixels

    device = torch.device("cpu")
    images_on, teacher_on = online.open(online_cfg.student, device)({"image": torch.from_numpy(rows_on["image"][pick])},
                                                                   device)
    images_ca, teacher_ca = cached.open(cache_cfg.student, device)(
        {"image": torch.from_numpy(rows_ca["image"][:12]), "tokens": torch.from_numpy(rows_ca["tokens"][:12])}, device)
    torch.testing.assert_close(images_on, images_ca, rtol=0, atol=0)
    torch.manual_seed(0)
    student = build_student("nano", img_size=32, patch_size=4, out_dim=32).eval()
    obj = ObjectiveConfig(name=objective)
    keep = draw_keep(mask_gen("block_reversed", (8, 8), 0.5), 12, seed=0, rank=0, step=0)
    with torch.no_grad():
        loss_on = step_loss(StudentForward(student, obj), images_on, teacher_on, keep, obj).item()
        loss_ca = step_loss(StudentForward(student, obj), images_ca, teacher_ca, keep, obj).item()
        other = step_loss(StudentForward(student, obj), images_ca, torch.roll(teacher_ca, 1, dims=0), keep, obj).item()
    assert loss_on == pytest.approx(loss_ca, abs=1e-3)  # fp16 storage of the tokens
    assert abs(other - loss_on) > 1e-3  # and the check can tell batches apart


def test_a_cache_without_pixels_trains_on_views_rebuilt_from_its_inputs(pretrain_ws, tmp_path):
    """``output.pixel_format=none``: the rank's stream rebuilds every view from the input shard,
    bit for bit the pixels of the lossless (PNG) cache of the same inputs and views."""
    ws, out = pretrain_ws, tmp_path / "cache-none"
    write_cache_in_process(load_config(CacheConfig, None, [
        f"input.paths={ws.train}", f"output.path={out}", f"teacher.arch={ws.arch}", f"teacher.pretrained={ws.weights}",
        "teacher.precision=fp32", "views.size=32", "num_views=2", "tracking.enabled=false",
        "output.pixel_format=none"]))
    _, _, manifest, paths = open_cache(str(out))
    assert all(len(v) == 0 for p in paths for v in pq.read_table(p, columns=["pixels"]).column(0).to_pylist())
    stored = {}  # the PNG cache's views: what the rebuilt views must equal
    for p in open_cache(str(ws.cache))[3]:
        rows = cache_rows({c: col for c, col in zip(["key", "view", "pixels", "tokens", "label"], pq.read_table(
            p, columns=["key", "view", "pixels", "tokens", "label"]).columns)})
        stored.update(zip(rows["sample_id"].tolist(), rows["image"]))

    source = target_source(pretrain_config(ws, "none", "cache", f"data.cache={out}", "data.cache_views=all"))
    sources = source.plan().sources
    assert all(part.rebuild is not None for part in sources.items)
    stream = EpochStream(sources, source.reader, serial_read, rank=0, world=1, seed=0, shuffle_sources=True,
                         micro_batch=8, rows_per_step=8)
    seen = set()
    for batch, _ in itertools.islice(stream.batches(0, Cursor()), stream.steps(0)):
        for sid, image in zip(batch["sample_id"].tolist(), batch["image"]):
            np.testing.assert_array_equal(image, stored[sid])
            seen.add(sid)
    assert len(seen) == stream.steps(0) * 8 >= sources.total_rows - 8
    # An input that changed under the cache is named, with what to do.
    names = sorted(manifest.shards)
    first, second = (Path(manifest.shards[n].input_shard["path"]) for n in names[:2])
    original = first.read_bytes()
    first.write_bytes(second.read_bytes())  # other samples under the first shard's name
    try:
        with pytest.raises(ValueError, match="rebuilds its views from its input shards"):
            for _ in itertools.islice(stream.batches(0, Cursor()), stream.steps(0)):
                pass
    finally:
        first.write_bytes(original)


# --------------------------------------------------------------------- end to end on Ray
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_two_ray_workers_on_s3_survive_a_sigkilled_worker_and_train_the_rows_of_the_run_without_ray(
    pretrain_ws, ray_local, s3_server, s3_client, s3_bucket, monkeypatch, tmp_path
):
    """Cache, checkpoints, samples and export on S3 (moto), two Ray Train workers. Rank 0's process
    SIGKILLs itself after step 3 (checkpoint at 2); FailureConfig(max_failures=1) restarts the group,
    which resumes from the newest checkpoint: each rank's rows are then exactly those of the same
    two-rank run, uninterrupted and without Ray (LocalRuntime, gloo)."""
    ws = pretrain_ws
    upload_tree(s3_client, s3_bucket, "cache", ws.cache)
    storage, s3 = f"s3://{s3_bucket}/runs", S3Options(endpoint_url=s3_server)
    sigkill = Fault(step=3, kind="sigkill", once=tmp_path / "struck")  # rank 0's process, once
    monkeypatch.setattr(pretrain_job, "plan_pretrain", faulty_plans(pretrain_job.plan_pretrain, sigkill))
    cfg = pretrain_config(ws, "ray", "cache", "cluster.num_workers=2", "cluster.cpus_per_worker=0.5",
                          "train.max_steps=6", "run.max_failures=1", f"data.cache=s3://{s3_bucket}/cache",
                          f"s3.endpoint_url={s3_server}", storage=storage)
    run(cfg)  # on the session's local Ray
    monkeypatch.undo()
    client, mlrun = pretrain_run(ws.mlflow, "ray")
    history = sorted(client.get_metric_history(mlrun.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 3, 4, 5, 6]  # step 3 again after the restart
    assert mlrun.data.tags["uta.resumed_from_step"] == "2" and mlrun.info.status == "FINISHED"
    final = checkpoint_state(storage, "ray", 6, s3)  # AdamW counts its steps: 6 only if step 2's state came back
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {6}
    killed = [samples_seen(storage, "ray", rank, s3=s3) for rank in (0, 1)]
    straight = pretrain_config(ws, "no-ray", "cache", "cluster.num_workers=2", "train.max_steps=6")
    assert train_ranks(straight, 2, tmp_path) == [0, 0]
    assert killed == [samples_seen(str(ws.root / "runs"), "no-ray", rank) for rank in (0, 1)]
    keys = train_keys(ws)
    assert len(killed[0]) == len(set(killed[0])) == 48 and not set(killed[0]) & set(killed[1])
    assert set(killed[0]) | set(killed[1]) <= {sample_id(k, 0) for k in keys}  # cycle: stored view 0 in epoch 0
    # evaluate.py agrees on the S3 export, from the classifier file's text embeddings.
    out = evaluate(load_config(EvaluateConfig, None, [
        f"model={storage}/ray", f"input.paths={ws.heldout}", f"classifier_path={ws.classifier}",
        f"retrieval_input.paths={ws.heldout}", "max_images=40", "tracking.enabled=false",
        f"s3.endpoint_url={s3_server}"]))
    assert out["step"] == 6 and out["zeroshot_top1"] == pytest.approx(mlrun.data.metrics["zeroshot_top1"])
    for key in ("retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_t2i_r5"):
        assert out[key] == pytest.approx(mlrun.data.metrics[key]), key

"""The one training loop without Ray (``LocalRuntime``): resume, cursors across ranks and epochs,
the checkpoint it resumes from, the MLflow run it continues, for both jobs.

Each run is the real job (pre-training on digits with a tiny teacher from a file, or the
contrastive stage) with its real data path, checkpoints on disk and SQLite MLflow; only the
runtime differs from a cluster run. Several ranks are several processes joined by gloo.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from faults import Fault, faulty_plans
from helpers import checkpoint_state, pretrain_config, pretrain_in_process, pretrain_run, samples_seen, train_ranks

from pipelines.lib.contrastive import job as contrastive
from pipelines.lib.contrastive.config import DEFAULT_CONFIG as CONTRASTIVE_CONFIG
from pipelines.lib.contrastive.config import ContrastiveJobConfig
from pipelines.lib.train.backends import InProcess
from uta_core.config import load_config
from uta_core.models.clip import tiny_clip_config
from uta_core.optim import lr_at
from uta_core.run.folder import checkpoint_dir_name


@pytest.fixture(scope="module")
def ws(pretrain_ws):
    return pretrain_ws


def config(ws, name: str, mode: str, *extra: str):
    return pretrain_config(ws, name, mode, *extra)


def train(cfg, fault: Fault | None = None) -> dict:
    return pretrain_in_process(cfg, fault)


def state(ws, name: str, step: int) -> dict:
    return checkpoint_state(str(ws.root / "runs"), name, step)


def rows_seen(ws, name: str, rank: int = 0, epoch: int = 0) -> list[int]:
    return samples_seen(str(ws.root / "runs"), name, rank, epoch)


# --------------------------------------------------------------------- one rank
@pytest.fixture(scope="module")
def straight(ws):
    """An uninterrupted online run: 120 rows, 2 micro-batches of 8 a step -> 7 steps an epoch; 10 steps."""
    train(config(ws, "straight", "online", "train.global_batch=16", "train.max_steps=10"))
    return state(ws, "straight", 10)


@pytest.mark.parametrize("fail_at", [3, 9])  # inside epoch 0, inside epoch 1
def test_a_stopped_and_resumed_run_trains_the_uninterrupted_runs_rows_to_the_same_weights(ws, straight, fail_at,
                                                                                           tmp_path):
    name = f"resumed-{fail_at}"
    cfg = config(ws, name, "online", "train.global_batch=16", "train.max_steps=10")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, Fault(step=fail_at, once=tmp_path / "struck"))
    assert (ws.root / "runs" / name / checkpoint_dir_name(fail_at - 1)).is_dir()
    train(cfg)  # the same run name again: it resumes from the checkpoint before the failure
    for epoch in (0, 1):
        assert rows_seen(ws, name, epoch=epoch) == rows_seen(ws, "straight", epoch=epoch)
    assert len(rows_seen(ws, name, epoch=0)) == 7 * 16 and len(rows_seen(ws, name, epoch=1)) == 3 * 16
    final = state(ws, name, 10)
    for key, value in straight["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=0, msg=key)
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {10}  # AdamW never restarted
    client, run = pretrain_run(ws.mlflow, name)  # one MLflow run, continued
    assert run.info.status == "FINISHED" and run.data.tags["uta.resumed_from_step"] == str(fail_at - 1)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == sorted([*range(1, 11), fail_at])  # the failed step, logged by both attempts
    for m in client.get_metric_history(run.info.run_id, "lr"):  # the schedule the optimiser used
        assert m.value == pytest.approx(lr_at(m.step - 1, base_lr=2e-3, min_lr=1e-5, warmup_steps=1, total_steps=10))


def truncate(path: Path) -> None:  # an upload killed half-way
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:  # 64 bytes changed in the middle of the tensors, the size unchanged (bit rot)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, line", [(truncate, "bytes, its checkpoint.json records"),
                                          (flip, "differ from the sha256")])
def test_a_resume_skips_a_damaged_checkpoint_with_one_line_and_takes_the_previous_complete_one(ws, tmp_path, caplog,
                                                                                               damage, line):
    """torch's zip reader checks no CRC: a flipped byte in a tensor loads without error. The checkpoint's
    record (sizes and sha256, written last) catches both, and the run resumes from step 2 instead of 4."""
    name = f"damaged-{damage.__name__}"
    cfg = config(ws, name, "cache", "train.max_steps=6", "run.keep_checkpoints=3")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, Fault(step=5, once=tmp_path / "struck"))
    damage(ws.root / "runs" / name / checkpoint_dir_name(4) / "state.pt")
    caplog.clear()
    train(cfg)
    _, run = pretrain_run(ws.mlflow, name)
    assert run.data.tags["uta.resumed_from_step"] == "2" and state(ws, name, 6)["position"]["step"] == 6
    (warning,) = [r.getMessage() for r in caplog.records if "checkpoint_0000004" in r.getMessage()]
    assert line in warning and "resuming from an older checkpoint" in warning and "\n" not in warning


def test_rerunning_a_finished_run_trains_nothing_and_evaluates_once(ws):
    cfg = config(ws, "finished", "cache", "train.max_steps=2")
    first = train(cfg)
    again = train(cfg)
    assert again["metrics"]["step"] == 2 and again["metrics"]["zeroshot_top1"] == first["metrics"]["zeroshot_top1"]
    assert state(ws, "finished", 2)["scheduler"]["last_epoch"] == 2


def test_a_run_starts_from_a_trained_student_and_refuses_another_architecture(ws, straight):
    """``init_from=<another run's export>``: at a learning rate too small to move it, the new run ends
    at the weights it started from; a start of another architecture is refused before any step,
    naming the settings that would make it fit."""
    from uta_core.models.trained import load_export

    export = ws.root / "runs" / "straight" / "export"
    train(config(ws, "from-straight", "cache", f"init_from={export}", "train.max_steps=1", "optim.lr=1e-12",
                 "optim.min_lr=0", "optim.weight_decay=0"))
    start, _ = load_export(export)
    ended, _ = load_export(ws.root / "runs" / "from-straight" / "export")
    for name, value in start.state_dict().items():
        if name != "mask_token":  # not part of an export: MIM's only
            torch.testing.assert_close(ended.state_dict()[name], value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="set student.variant='nano'"):
        train(config(ws, "other", "cache", f"init_from={export}", "student.variant=micro"))
    assert not (ws.root / "runs" / "other").exists()  # refused before the run folder was taken


# --------------------------------------------------------------------- two ranks (gloo)
def test_two_ranks_stopped_and_resumed_each_train_their_own_uninterrupted_rows(ws, tmp_path):
    """Rank 0 is SIGKILLed after step 3 (checkpoint at 2); the rerun resumes both ranks at their own
    cursors: each rank's rows are those of an uninterrupted two-rank run, none twice, none shared."""
    args = ("cluster.num_workers=2", "train.max_steps=6")
    assert train_ranks(config(ws, "ranks-straight", "cache", *args), 2, tmp_path) == [0, 0]
    cfg = config(ws, "ranks-resumed", "cache", *args)
    codes = train_ranks(cfg, 2, tmp_path, Fault(step=3, kind="sigkill", once=tmp_path / "struck"))
    assert codes[0] == -9 and codes[1] != 0  # rank 1 learns of the loss from gloo
    assert train_ranks(cfg, 2, tmp_path) == [0, 0]
    resumed = [rows_seen(ws, "ranks-resumed", rank) for rank in (0, 1)]
    assert resumed == [rows_seen(ws, "ranks-straight", rank) for rank in (0, 1)]
    assert all(len(r) == len(set(r)) == 6 * 8 for r in resumed) and not set(resumed[0]) & set(resumed[1])
    for rank in (0, 1):
        names = sorted(p.name for p in (ws.root / "runs" / "ranks-resumed" / "samples").glob(f"rank{rank}-*"))
        assert names == [f"rank{rank}-epoch0000-from{s:07d}.txt" for s in (0, 2, 4)]
    cursors = state(ws, "ranks-resumed", 6)["position"]["cursors"]
    assert len(cursors) == 2 and cursors[0] != cursors[1]


# --------------------------------------------------------------------- the contrastive job
def test_the_contrastive_stage_resumes_in_the_same_mlflow_run_with_its_temperature(ws, tmp_path, monkeypatch):
    clip = tiny_clip_config()
    cfg = load_config(ContrastiveJobConfig, CONTRASTIVE_CONFIG, [
        "model.clip.name=uta-loop-clip", f"model.clip.embed_dim={clip['embed_dim']}",
        f"model.clip.vision={clip['vision_cfg']}", f"model.clip.text={clip['text_cfg']}",
        f"data.input.paths={ws.train}", "train.micro_batch=16", "train.max_steps=6", "train.warmup_steps=1",
        "run.checkpoint_every=2", "run.log_every=2", "run.name=clip", f"run.storage_path={ws.root / 'runs'}",
        f"tracking.tracking_uri={ws.mlflow}", "loss.temperature=0.01", "loss.learnable_temperature=false"])
    planner = contrastive.plan_contrastive
    monkeypatch.setattr(contrastive, "plan_contrastive", faulty_plans(planner, Fault(step=3, once=tmp_path / "x")))
    with pytest.raises(RuntimeError, match="injected failure"):
        contrastive.run(cfg, InProcess())
    monkeypatch.setattr(contrastive, "plan_contrastive", planner)
    report = contrastive.run(cfg, InProcess())
    final = state(ws, "clip", 6)
    assert final["position"]["step"] == 6 and final["scheduler"]["last_epoch"] == 6
    assert torch.equal(final["model"]["logit_scale"], torch.tensor(math.log(100.0)))  # fixed: never updated
    assert [h["temperature"] for h in report["history"]] == [pytest.approx(0.01, rel=1e-6)] * 2  # steps 4, 6
    client = mlflow.tracking.MlflowClient(ws.mlflow)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["uta.resumed_from_step"] == "2" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [2, 4, 6]
    assert Path(report["export"], "uta-loop-clip.pt").is_file()

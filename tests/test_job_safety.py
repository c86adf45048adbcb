"""What every job does with bad input before it starts anything: one line naming the key or
path and the fix, exit 2, nothing written (no Ray, no MLflow run, no file), no secret echoed.

The jobs run in this process through their ``main(argv)``, as the command line runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from pipelines import cache_teacher, contrastive, demo, evaluate, pretrain, sweep
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.destinations import JOB_CONFIG_ENV, check_output
from pipelines.lib.smoke import cache_overrides, tiny_teacher
from uta_core.cache.format import MANIFEST_NAME, Manifest, load_manifest, manifest_path
from uta_core.cache.plan import build_cache_teacher, cache_settings, plan_cache, prepare_output
from uta_core.config import load_config
from uta_core.data.storage import is_atomic_leftover
from uta_core.data.views import ImageDecodeError, decode_image

PLANTED = "planted-Pa55word-7c1e"  # must never appear in any output
JOBS = {"cache_teacher": cache_teacher.main, "pretrain": pretrain.main, "contrastive": contrastive.main,
        "sweep": sweep.main, "evaluate": evaluate.main, "demo": demo.main}


def run_job(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    code = JOBS[name](argv)
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


RAY_STARTS: list = []


@pytest.fixture
def quiet_env(monkeypatch, tmp_path):
    """No tracking server from the caller's environment; run from an empty folder; any attempt
    to start or join Ray is recorded (and refused), whether or not this session runs a Ray."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    RAY_STARTS.clear()

    def no_ray(*args, **kwargs):
        RAY_STARTS.append((args, kwargs))
        raise AssertionError("the job started Ray before its checks passed")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    return tmp_path


def assert_refused(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert RAY_STARTS == []
    return lines[0]


# --------------------------------------------------------------------- config files
@pytest.mark.parametrize("job", ["cache_teacher", "pretrain", "contrastive", "sweep", "demo"])
def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_place(job, quiet_env, capsys):
    bad = quiet_env / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3, 2e-3\n  steps: 3\n")
    code, _, err = run_job(job, ["--config", str(bad)], capsys)
    assert_refused(code, err, str(bad), "is not valid YAML", "line 3")
    assert files_under(quiet_env) == [bad]


def test_a_bad_yaml_override_value_names_the_override(quiet_env, capsys):
    code, _, err = run_job("pretrain", ["optim.lr=[1e-3,"], capsys)
    assert_refused(code, err, "override 'optim.lr=[1e-3,'", "not valid YAML")


# --------------------------------------------------------------------- secrets
SECRET_URI = f"http://mlflow-user:{PLANTED}@127.0.0.1:9"
JOB_ARGS = {  # enough for each job to reach its tracking check
    "cache_teacher": ["input.paths=in/*.tar", "output.path=cache", "teacher_random_seed=0"],
    "pretrain": ["data.input.paths=in"],
    "contrastive": ["data.input.paths=in"],
    "sweep": ["data.input.paths=in"],
    "evaluate": ["zeroshot", "model=model", "input.paths=in"],
}


@pytest.mark.parametrize("job", sorted(JOB_ARGS))
def test_a_password_in_the_mlflow_uri_is_refused_and_never_printed(job, quiet_env, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    code, out, err = run_job(job, JOB_ARGS[job], capsys)
    line = assert_refused(code, err, "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD")
    assert PLANTED not in out + err and "***@127.0.0.1" in line
    assert files_under(quiet_env) == []  # no mlflow.db, no run folder


@pytest.mark.parametrize("job,key", [("pretrain", "tracking.tracking_uri"), ("demo", "tracking_uri"),
                                     ("cache_teacher", "tracking.tracking_uri")])
def test_a_password_in_a_configured_mlflow_uri_is_refused_and_never_printed(job, key, quiet_env, capsys):
    code, out, err = run_job(job, [*JOB_ARGS.get(job, []), f"{key}={SECRET_URI}"], capsys)
    assert_refused(code, err, "embeds user:password")
    assert PLANTED not in out + err and files_under(quiet_env) == []


@pytest.mark.parametrize("job,key", [("cache_teacher", "s3.endpoint_url"), ("pretrain", "s3.endpoint_url"),
                                     ("evaluate", "s3.endpoint_url")])
def test_a_password_in_the_s3_endpoint_is_refused_and_never_printed(job, key, quiet_env, capsys):
    argv = [*JOB_ARGS[job], f"{key}=http://minio:{PLANTED}@127.0.0.1:9000"]
    code, out, err = run_job(job, argv, capsys)
    assert_refused(code, err, "endpoint_url=", "***@127.0.0.1:9000")
    assert PLANTED not in out + err and files_under(quiet_env) == []


# --------------------------------------------------------------------- where outputs go
SUBMITTED_JOB = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}})


@pytest.mark.parametrize("job,argv,key", [
    ("pretrain", ["run.storage_path=runs", "tracking.tracking_uri=sqlite:////tmp/x.db"], "run.storage_path='runs'"),
    ("cache_teacher", ["tracking.enabled=false"], "output.path='cache'"),
    ("sweep", ["run.storage_path=/tmp/runs", "tracking.tracking_uri=sqlite:////tmp/x.db"],
     "--storage-path='runs/sweeps'"),
    ("pretrain", ["run.storage_path=/tmp/runs"], "default store ./mlflow.db"),
])
def test_inside_a_submitted_job_relative_outputs_are_refused(job, argv, key, quiet_env, capsys, monkeypatch):
    """Under ``ray job submit --working-dir`` (Ray's job config in the environment), a relative
    path would land in the job's temporary copy of the working dir, which Ray deletes."""
    monkeypatch.setenv(JOB_CONFIG_ENV, SUBMITTED_JOB)
    code, _, err = run_job(job, [*JOB_ARGS[job], *argv], capsys)
    assert_refused(code, err, key, "uploaded working directory")
    assert files_under(quiet_env) == []


def test_outside_a_submitted_job_relative_and_absolute_outputs_pass(quiet_env, monkeypatch):
    check_output("run.storage_path", "runs")
    monkeypatch.setenv(JOB_CONFIG_ENV, SUBMITTED_JOB)
    check_output("run.storage_path", str(quiet_env.parent / "shared" / "runs"))  # outside the job's folder
    check_output("output.path", "s3://bucket/cache")
    with pytest.raises(ValueError, match="uploaded working directory"):
        check_output("run.storage_path", str(quiet_env / "runs"))  # absolute, but inside it


@pytest.mark.parametrize("job,argv,key", [
    ("cache_teacher", [*JOB_ARGS["cache_teacher"][:-2], "teacher_random_seed=0"], "output.path"),
    ("pretrain", JOB_ARGS["pretrain"], "run.storage_path"),
])
def test_an_output_below_a_file_is_refused_before_ray_or_mlflow(job, argv, key, quiet_env, capsys):
    blocker = quiet_env / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_job(job, [*argv, f"{key}={blocker}/out"], capsys)
    assert_refused(code, err, f"{key}={blocker}/out", f"{blocker} is a file, not a folder")
    assert files_under(quiet_env) == [blocker]


# --------------------------------------------------------------------- cache-specific messages
def test_a_view_size_that_is_not_whole_patches_names_views_size(quiet_env, capsys):
    argv = [*cache_overrides(quiet_env / "in", shards=1, per_shard=2), "views.size=30"]
    code, _, err = run_job("cache_teacher", argv, capsys)
    line = assert_refused(code, err, "views.size=30", "multiple of 4 (e.g. 28 or 32)")
    assert "teacher.image_size" not in line
    assert not (quiet_env / "in" / "cache").exists()


def test_an_undecodable_image_is_explained_without_memory_addresses():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"this is not an image")
    assert "object at 0x" not in str(err.value) and "not an image format PIL can read" in str(err.value)


KILL_IN_RENAME = """
import os, signal, sys
import pyarrow.fs as pafs
from uta_core.data.storage import write_bytes_atomic
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # die between the write and the rename
write_bytes_atomic(pafs.LocalFileSystem(), sys.argv[1], b'{"partial": true}')
"""


def kill_during_manifest_save(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_IN_RENAME, str(root / MANIFEST_NAME)],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("first_save", [True, False])
def test_a_kill_during_a_manifest_save_never_blocks_the_rerun(first_save, tmp_path):
    overrides = cache_overrides(tmp_path, shards=1, per_shard=2)
    cfg = load_config(CacheConfig, None, overrides)
    root = Path(cfg.output.path)
    root.mkdir()
    teacher = build_cache_teacher(cfg)
    if not first_save:  # an existing cache: the kill hit a later save
        (root / MANIFEST_NAME).write_text(Manifest(settings=cache_settings(cfg, teacher)).to_json())
    kill_during_manifest_save(root)
    leftovers = [p for p in root.iterdir() if is_atomic_leftover(p.name, MANIFEST_NAME)]
    assert len(leftovers) == 1  # what the killed process left
    plan = plan_cache(cfg, teacher)  # neither refused as "not empty" nor confused by the leftover
    prepare_output(plan)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME]
    assert load_manifest(plan.fs, str(root)).shards == {} and Path(manifest_path(str(root))).is_file()


def test_tiny_teacher_overrides_are_what_the_cache_test_expects(tmp_path):
    """The patch size the views.size message quotes comes from the smoke teacher (4 px)."""
    arch = json.loads(Path(tiny_teacher(tmp_path)[0].split("=", 1)[1]).read_text())
    assert arch["vision_cfg"]["patch_size"] == 4


# --------------------------------------------------------------------- hints that name the key to type
@pytest.mark.parametrize("job,argv,hint", [
    ("contrastive", [], "error: data.input.paths is empty: pass data.input.paths=<path, glob, [list] or "
                        "s3://bucket/prefix> (e.g. data.input.paths='data/shards/*.tar')"),
    ("cache_teacher", ["output.path=cache"], "error: input.paths is empty: pass input.paths=<path"),
    ("pretrain", ["optim.lr"], "error: override 'optim.lr' is not of the form key=value (e.g. optim.lr=1e-3)"),
    # the inputs are listed before Ray starts (quiet_env refuses to start it), and the key is the job's
    ("pretrain", ["data.teacher_mode=online", "data.input.paths=missing/shards", "teacher_random_seed=0"],
     "error: input path missing/shards does not exist; check data.input.paths"),
    ("contrastive", ["data.input.paths=missing/*.tar"], "error: input pattern missing/*.tar: the folder "),
])
def test_a_hint_names_a_key_the_user_can_type(job, argv, hint, quiet_env, capsys):
    code, _, err = run_job(job, argv, capsys)
    line = assert_refused(code, err)
    assert line.startswith(hint), line
    if "input" in hint and "empty" not in hint:  # a missing input names the key the job reads it from
        assert line.endswith("check data.input.paths"), line


# --------------------------------------------------------------------- S3 paths of models and weights
@pytest.mark.parametrize("job,argv", [
    ("evaluate", ["zeroshot", "model=s3://{bucket}/runs/x", "input.paths=in"]),
    ("export", ["model=s3://{bucket}/runs/x", "output=exported"]),
])
def test_a_model_path_on_s3_that_is_not_there_is_one_line(job, argv, quiet_env, capsys, s3_server, s3_bucket):
    from pipelines import export

    jobs = {**JOBS, "export": export.main}
    argv = [a.format(bucket=s3_bucket) for a in argv] + [f"s3.endpoint_url={s3_server}"]
    code, _, err = jobs[job](argv), None, capsys.readouterr().err
    assert_refused(code, err, f"model=s3://{s3_bucket}/runs/x does not exist")


def test_teacher_weights_on_s3_without_credentials_say_so_and_not_that_s3_is_unreachable(quiet_env, capsys,
                                                                                         s3_server, monkeypatch):
    from uta_core.data.storage import boto3_client

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(quiet_env / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(quiet_env / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    boto3_client.cache_clear()
    try:
        (quiet_env / "in").mkdir()
        write_tar = __import__("conftest").write_digits_webdataset
        write_tar(quiet_env / "in", shards=1, per_shard=2)
        code, _, err = run_job("cache_teacher", ["teacher.pretrained=s3://weights/w.pt", "input.paths=in/*.tar",
                                                 "output.path=cache", f"s3.endpoint_url={s3_server}"], capsys)
    finally:
        boto3_client.cache_clear()
    line = assert_refused(code, err, "no AWS credentials were found for s3://weights/w.pt", "AWS_ACCESS_KEY_ID")
    assert "cannot reach" not in line and not (quiet_env / "cache").exists()

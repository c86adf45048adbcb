"""Shared fixtures: a local Ray, an S3 API on loopback (moto), real images as WebDataset shards.

- ``aws_test_env``: fake AWS credentials in the environment for the session (restored at
  the end). ``ray_local`` depends on it because Ray workers inherit the environment of
  the process that starts Ray: workers reading the moto bucket need the variables too.
- ``ray_local``: a 2-CPU local Ray (``start_local_ray``) once per session (reused if already running).
- ``s3_server``: moto's ``ThreadedMotoServer`` on 127.0.0.1 with a free port -> endpoint URL;
  ``s3_client`` a boto3 client for it; ``s3_bucket`` a fresh bucket per test.
- ``digits_webdataset``: scikit-learn's digits (real, labelled images) written as
  img2dataset-style tars (``key.png``, ``key.cls``, ``key.txt`` captions).

A test that starts Ray, in its process or in one it starts, is marked ``ray`` (or uses ``ray_local``):
``./uta test`` runs those in one lane and the rest beside them at idle priority (``tests/run.py``).
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from uta_core.data.digits import digits_samples, webdataset_bytes
from uta_core.data.shards import Sample

# Native stderr as Ray writes it (pipelines/lib/native_stderr.py's filter off), in this process and the jobs it
# starts: pytest captures file descriptor 2 itself; tests/test_console.py runs the filter in a process of its own.
os.environ.setdefault("UTA_NATIVE_STDERR", "raw")

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "UTATESTKEYID0000",
    "AWS_SECRET_ACCESS_KEY": "uta-test-secret-never-logged-1f2e3d",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata endpoint
}


@pytest.fixture(scope="session")
def aws_test_env():
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    yield dict(FAKE_AWS_ENV)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(aws_test_env):
    import ray

    from pipelines.lib.ray_setup import start_local_ray

    started = not ray.is_initialized()
    if started:
        # uta_test_teacher: a custom resource, as a cluster's teacher node group offers (tests/test_streamed.py)
        start_local_ray(num_cpus=2, log_to_driver=True, resources={"uta_test_teacher": 2})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(aws_test_env):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@dataclass
class DigitsShards:
    root: Path
    paths: list[Path]
    samples: dict[str, list[Sample]]  # shard file name -> its samples

    def all_samples(self) -> dict[str, Sample]:
        return {s.key: s for samples in self.samples.values() for s in samples}


def write_digits_webdataset(root: Path, shards: int = 3, per_shard: int = 10, size: int = 32) -> DigitsShards:
    root.mkdir(parents=True, exist_ok=True)
    paths, samples = [], {}
    for i in range(shards):
        path = root / f"{i:05d}.tar"
        shard = digits_samples(per_shard, size=size, offset=i * per_shard)
        path.write_bytes(webdataset_bytes(shard))
        paths.append(path)
        samples[path.name] = shard
    return DigitsShards(root=root, paths=paths, samples=samples)


@pytest.fixture(scope="session")
def digits_webdataset(tmp_path_factory) -> DigitsShards:
    """3 shards x 10 digits, 32 px RGB PNG, with .cls labels and .txt captions."""
    return write_digits_webdataset(tmp_path_factory.mktemp("digits_wds"))


PRETRAIN_TEACHER = "uta-pretrain-tiny"  # 32 px, patch 4 -> 8x8 grid, D = 32


@pytest.fixture(scope="session")
def pretrain_ws(tmp_path_factory):
    """What pre-training tests train on: digits (120 train in 4 shards with img2dataset stats files,
    40 held out), a tiny teacher whose weights live in a file (so the cache, the workers and the
    references load the same teacher), its lossless (PNG) cache of 2 views per image, written by
    the caching job's own pieces in-process, and a classifier file with the held-out captions."""
    from helpers import tiny_clip_model, write_cache_in_process, write_model_config

    from pipelines.lib.cache.config import CacheConfig
    from pipelines.lib.evaluate.job import EvaluateConfig, build_classifier_file
    from uta_core.config import load_config
    from uta_core.data.digits import CLASS_NAMES, write_digits_splits

    root = tmp_path_factory.mktemp("pretrain")
    write_digits_splits(root / "digits", size=32, heldout_fraction=0.25, samples_per_shard=32, limit=160)
    arch = write_model_config(root, name=PRETRAIN_TEACHER)
    weights = root / "teacher.pt"
    torch.save(tiny_clip_model(seed=0).state_dict(), weights)
    teacher = [f"teacher.arch={arch}", f"teacher.pretrained={weights}"]
    write_cache_in_process(load_config(CacheConfig, None, [
        f"input.paths={root / 'digits' / 'train'}", f"output.path={root / 'cache'}", *teacher,
        "teacher.precision=fp32", "views.size=32", "num_views=2", "ray.images_per_block=16",
        "tracking.enabled=false", "output.pixel_format=png"]))  # lossless: the cache's pixels equal online views
    build_classifier_file(load_config(EvaluateConfig, None, [
        *teacher, f"classnames=[{', '.join(CLASS_NAMES)}]", "templates=['a photo of the digit {}.']",
        f"retrieval_input.paths={root / 'digits' / 'heldout'}", f"output={root / 'classifier.pt'}", "device=cpu"]))
    return SimpleNamespace(root=root, train=root / "digits" / "train", heldout=root / "digits" / "heldout",
                           arch=str(arch), weights=str(weights), cache=root / "cache",
                           classifier=root / "classifier.pt", mlflow=f"sqlite:///{root / 'mlflow.db'}")


LANES = ("ray", "cpu")


def pytest_addoption(parser):
    parser.addoption("--lane", choices=LANES, help="run only the tests that start Ray (ray: marked `ray` or on "
                     "the session's `ray_local`) or only the others (cpu); `./uta test` runs both side by side "
                     "(tests/run.py)")


def starts_ray(item) -> bool:
    return item.get_closest_marker("ray") is not None or "ray_local" in item.fixturenames


# Order: first the tests whose jobs start a Ray of their own (in their own processes), before the
# session's local Ray (``ray_local``) exists: beside it they ran slower on 2 cores (the demo at 32 px:
# 252 s alone, 308 s after four test files that start it, 333-367 s in the whole suite). Then the
# files that need no Ray, then those that use the session's Ray: once started, an idle Ray takes
# ~0.09 of a core (measured over 30 s), and a file stays in one piece (its module fixtures once).
def pytest_collection_modifyitems(config, items):
    lane = config.getoption("lane")
    if lane:
        keep, drop = [], []
        for item in items:
            (keep if starts_ray(item) == (lane == "ray") else drop).append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    on_session_ray = {item.path.name for item in items if "ray_local" in item.fixturenames}

    def group(item) -> int:
        return 2 if item.path.name in on_session_ray else 0 if starts_ray(item) else 1

    items.sort(key=group)  # stable: file order otherwise kept


def pytest_sessionfinish(session, exitstatus):
    """The Ray-free lane runs beside the Ray lane on the same cores: a test there that starts Ray
    is missing its ``ray`` mark, and this says which lane it belongs to."""
    ray = sys.modules.get("ray")
    if session.config.getoption("lane") == "cpu" and ray is not None and ray.is_initialized():
        session.config.get_terminal_writer().line("a test of the cpu lane started Ray: mark it `ray`", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Shared fixtures: a local Ray, an S3 API on loopback (moto), real images as WebDataset shards.

- ``aws_test_env``: fake AWS credentials in the environment for the session (restored at
  the end). ``ray_local`` depends on it because Ray workers inherit the environment of
  the process that starts Ray: workers reading the moto bucket need the variables too.
- ``ray_local``: a 2-CPU local Ray (``start_local_ray``) once per session (reused if already running).
- ``s3_server``: moto's ``ThreadedMotoServer`` on 127.0.0.1 with a free port -> endpoint URL;
  ``s3_client`` a boto3 client for it; ``s3_bucket`` a fresh bucket per test.
- ``digits_webdataset``: scikit-learn's digits (real, labelled images) written as
  img2dataset-style tars (``key.png``, ``key.cls``, ``key.txt`` captions).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from uta_core.data.digits import digits_samples, webdataset_bytes
from uta_core.data.shards import Sample

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
        start_local_ray(num_cpus=2, log_to_driver=True)
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

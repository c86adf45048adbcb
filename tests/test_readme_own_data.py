"""The README's "your own data" block, run as it is written: WebDataset shards on S3 (moto's server on
loopback), the caching job into a cache on S3, a pre-training run from that cache with its checkpoints and
export on S3. Each of its commands gets test-sized settings appended (``key=value`` given later wins): a
tiny random teacher, 32 px, a nano student, a few steps, the loopback endpoint, MLflow in a temp folder."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from pipelines.lib.smoke import tiny_teacher
from uta_core.data.digits import digits_samples, webdataset_bytes
from uta_core.models.clip import tiny_clip_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- own-data:begin -->\s*```bash\n(.*?)```\s*<!-- own-data:end -->", text, re.S)
    assert found, "README.md lost its own-data block"
    return found.group(1)


def with_test_sizes(block: str, extra: dict[str, list[str]]) -> str:
    """The block's commands (continuation lines joined), each pipeline command with its extras appended."""
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    out = []
    for line in lines:
        script = re.search(r"pipelines/(\w+\.py)", line)
        out.append(line + (" " + " ".join(f"'{e}'" for e in extra[script.group(1)]) if script else ""))
    return "set -euo pipefail\n" + "\n".join(out) + "\n"


@pytest.mark.timeout(600)
def test_the_readme_own_data_commands_run_as_written_on_s3(s3_server, s3_client, s3_bucket, aws_test_env, tmp_path):
    for i in range(2):  # img2dataset-style WebDataset tars
        samples = digits_samples(16, size=32, offset=16 * i)
        s3_client.put_object(Bucket=s3_bucket, Key=f"shards/{i:05d}.tar", Body=webdataset_bytes(samples))
    common = [f"s3.endpoint_url={s3_server}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    extra = {
        "cache_teacher.py": [*tiny_teacher(tmp_path), "views.size=32", "ray.num_cpus=2", "ray.batch_size=16",
                             *common],
        "pretrain.py": ["student.variant=nano", "student.img_size=32", "student.patch_size=4",
                        f"student.out_dim={tiny_clip_config()['embed_dim']}", "train.micro_batch=8",
                        "train.max_steps=4", "train.warmup_steps=1", "run.checkpoint_every=2", "run.log_every=2",
                        "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=1", *common],
    }
    script = with_test_sizes(readme_block(), extra).replace("s3://my-bucket", f"s3://{s3_bucket}")
    assert script.count("./uta python pipelines/") == 2
    env = {**os.environ, **aws_test_env}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, MaxKeys=1000).get("Contents", [])}
    assert "cache/manifest.json" in keys and any(k.startswith("cache/shards/") for k in keys)
    assert any(k.startswith("runs/my-first-uta/checkpoint_") for k in keys)
    assert any(k.startswith("runs/my-first-uta/export/") for k in keys)
    assert "Traceback" not in done.stderr

"""cluster/: every manifest parses and holds what cluster/README.md says it holds.

Static checks (seconds): YAML parses, RayJob entrypoints name real scripts and configs,
the one project image everywhere, GPUs only on workers, IAM roles instead of keys, spot
GPU workers, autoscaling bounds, the launcher config passes Ray's own validation, the
shell scripts parse, the README names every file. One `ray`-marked test starts the local
cluster with cluster/local/start.sh and submits jobs to it with and without the token; the
pre-training job it runs is also the SIGKILLed-driver fault trial.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from helpers import checkpoint_state, pretrain_run

from pipelines.lib.ray_setup import free_port
from pipelines.lib.smoke import pretrain_overrides
from uta_core.models.trained import load_export

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = CLUSTER / "README.md"
KNOWN_PIPELINES = {"cache_teacher", "pretrain", "sweep", "evaluate", "contrastive"}


def _pretrain_config():
    from pipelines.lib.pretrain.config import PretrainConfig

    return PretrainConfig


def _cache_config():
    from pipelines.lib.cache.config import CacheConfig

    return CacheConfig


def _contrastive_config():
    from pipelines.lib.contrastive.config import ContrastiveJobConfig

    return ContrastiveJobConfig


# The config class each pipeline loads its --config into (the sweep's base config is pre-training's).
CONFIG_CLASSES = {"pretrain": _pretrain_config, "sweep": _pretrain_config, "cache_teacher": _cache_config,
                  "contrastive": _contrastive_config}
GPU = "nvidia.com/gpu"
SECRET_PATTERNS = [
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # the shape of an AWS access key id
]


# ----------------------------------------------------------------------------- helpers
def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def yaml_files() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *(ROOT / "configs" / "cluster").glob("*.yaml")])


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{rel(path)} holds no YAML document"
    return docs


def k8s_objects() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for folder in ("kuberay", "mlflow")
        for path in sorted((CLUSTER / folder).glob("*.yaml"))
        for doc in load_docs(path)
    ]


def objects_of(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in k8s_objects() if doc["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob."""
    specs = [(f"{rel(p)}:RayCluster", d["spec"]) for p, d in objects_of("RayCluster")]
    specs += [(f"{rel(p)}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in objects_of("RayJob")]
    return specs


def pod_specs(obj: dict) -> list[dict]:
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayCluster":
        return cluster_pod_specs(spec)
    if kind == "RayJob":
        return cluster_pod_specs(spec["rayClusterSpec"])
    if kind == "Deployment":
        return [spec["template"]["spec"]]
    return []


def cluster_pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get("limits", {}).get(GPU, 0)), int(res.get("requests", {}).get(GPU, 0)))


def project_version() -> str:
    # The same line cluster/docker/build.sh reads (tomllib would need Python >= 3.11).
    (version,) = re.findall(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    return version


def project_image() -> str:
    return f"uta-pipelines:{project_version()}"


def ray_pin() -> str:
    pins = re.findall(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(pins) == 1, "pyproject.toml must pin ray exactly once as ray[...]==X.Y.Z"
    return pins[0]


def docker_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "docker" / "Dockerfile").read_text(), re.M)
    assert len(workdirs) == 1
    return workdirs[0]


def mlflow_service_uri() -> str:
    (_, svc), = objects_of("Service")
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def rayjobs() -> list[tuple[Path, dict]]:
    jobs = objects_of("RayJob")
    assert {p.name for p, _ in jobs} >= {"rayjob-pretrain.yaml", "rayjob-cache-teacher.yaml"}
    return jobs


def rayjob_params() -> list:
    return [pytest.param(path, job, id=path.name) for path, job in rayjobs()]


def spec_params() -> list:
    return [pytest.param(label, spec, id=label.split("/")[-1]) for label, spec in ray_cluster_specs()]


def entrypoint(job: dict) -> tuple[str, str, list[str]]:
    """(script, config, overrides) of `python pipelines/X.py --config configs/Y.yaml k=v ...`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:1] == ["python"] and len(argv) >= 4 and argv[2] == "--config", (
        f"entrypoint {job['spec']['entrypoint']!r} is not `python pipelines/<name>.py --config <yaml> [k=v ...]`"
    )
    assert all("=" in a and not a.startswith("-") for a in argv[4:]), f"overrides must be key=value: {argv[4:]}"
    return argv[1], argv[3], argv[4:]


def aws() -> dict:
    (cfg,) = load_docs(CLUSTER / "aws" / "cluster.yaml")
    return cfg


# ----------------------------------------------------------------------- parse / files
@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_every_yaml_parses_into_mappings(path):
    for doc in load_docs(path):
        assert isinstance(doc, dict), f"{rel(path)}: every document must be a mapping"


def test_k8s_objects_are_the_expected_kinds():
    kinds = sorted(d["kind"] for _, d in k8s_objects())
    assert kinds == sorted(["RayCluster", "RayJob", "RayJob", "ServiceAccount", "ServiceAccount", "Deployment",
                            "Service"])
    for path, doc in k8s_objects():
        assert doc["apiVersion"] == {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "Deployment": "apps/v1"}.get(
            doc["kind"], "v1"
        ), f"{rel(path)}: {doc['kind']} has apiVersion {doc['apiVersion']}"


DOC_COMMAND = re.compile(r"python (pipelines/[a-z_]+\.py)(?: [\w-]+)*?(?: --config (\S+\.yaml))?")


def _doc_commands() -> list[tuple[str, str, str | None]]:
    out = []
    for doc in (README, ROOT / "README.md"):
        out += [(rel(doc), script, config) for script, config in DOC_COMMAND.findall(doc.read_text())]
    return out


def _unknown_keys(cls: type, data: dict, prefix: str = "") -> list[str]:
    """Keys of ``data`` that ``cls`` (a config dataclass) does not have, recursively."""
    import dataclasses
    import typing

    hints, out = typing.get_type_hints(cls), []
    for key, value in data.items():
        if key not in hints:
            out.append(prefix + key)
            continue
        inner = [a for a in typing.get_args(hints[key]) or (hints[key],) if dataclasses.is_dataclass(a)]
        if inner and isinstance(value, dict):
            out += _unknown_keys(inner[0], value, f"{prefix}{key}.")
    return out


def test_every_command_the_readmes_show_names_an_existing_pipeline_and_a_config_of_its_keys():
    commands = _doc_commands()
    assert {Path(s).stem for _, s, _ in commands} >= {"cache_teacher", "pretrain", "sweep", "evaluate"}
    for doc, script, config in commands:
        assert (ROOT / script).is_file(), f"{doc} runs {script}, which does not exist"
        if config and Path(script).stem in CONFIG_CLASSES:
            assert (ROOT / config).is_file(), f"{doc}: {script} --config {config}: no such file"
            data = yaml.safe_load((ROOT / config).read_text()) or {}
            assert not _unknown_keys(CONFIG_CLASSES[Path(script).stem](), data), (doc, config)


# --------------------------------------------------------------------------- RayJobs
@pytest.mark.parametrize("path, job", rayjob_params())
def test_rayjob_entrypoint_names_existing_script_and_config(path, job):
    script, config, _ = entrypoint(job)
    assert re.fullmatch(r"pipelines/(\w+)\.py", script) and Path(script).stem in KNOWN_PIPELINES, script
    assert (ROOT / script).is_file(), f"{rel(path)} runs {script}, which does not exist"
    assert config.startswith("configs/") and (ROOT / config).is_file(), f"{rel(path)}: config {config} does not exist"
    from uta_core.config import load_config

    load_config(CONFIG_CLASSES[Path(script).stem](), ROOT / config)


@pytest.mark.parametrize("path, job", rayjob_params())
def test_rayjob_runtime_env_and_lifecycle(path, job):
    spec = job["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The code baked into the image is the working dir, so relative entrypoint paths resolve.
    assert runtime_env["working_dir"] == docker_workdir()
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow_service_uri()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec, "a RayJob with its own rayClusterSpec must not also select a cluster"


def test_rayjob_clusters_start_with_the_gpus_their_configs_use():
    for path, job in rayjobs():
        script, config, _ = entrypoint(job)
        cfg = yaml.safe_load((ROOT / config).read_text())
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        start_gpus = sum(g["minReplicas"] * gpus(c) for g in groups for c in g["template"]["spec"]["containers"])
        assert all(g["replicas"] == g["minReplicas"] for g in groups), f"{rel(path)}: start at full size"
        if Path(script).stem == "pretrain" and cfg["cluster"]["use_gpu"]:
            assert start_gpus >= cfg["cluster"]["num_workers"], f"{rel(path)}: fewer GPUs than training workers"
        if Path(script).stem == "cache_teacher":
            assert start_gpus >= 1 and cfg["ray"]["device"] in ("cuda", "auto")
            assert cfg["ray"].get("num_actors") in (None, *range(1, start_gpus + 1))


def test_cluster_configs_load_into_the_pipeline_dataclasses():
    from pipelines.lib.cache.config import CacheConfig
    from pipelines.lib.pretrain.config import PretrainConfig
    from uta_core.config import load_config

    pre = load_config(PretrainConfig, ROOT / "configs/cluster/pretrain.yaml")
    cache = load_config(CacheConfig, ROOT / "configs/cluster/cache_teacher.yaml")
    assert pre.data.teacher_mode == "cache" and pre.data.cache == cache.output.path
    teacher = ("ViT-L-14-quickgelu", "openai")
    assert (pre.teacher.arch, pre.teacher.pretrained) == (cache.teacher.arch, cache.teacher.pretrained) == teacher
    assert pre.student.img_size == cache.views.size
    for uri in (pre.run.storage_path, pre.data.cache, cache.output.path, *cache.input.paths):
        assert uri.startswith("s3://"), uri


# ------------------------------------------------------------------ Ray cluster specs
def test_every_ray_cluster_spec_is_checked():
    labels = [label for label, _ in ray_cluster_specs()]
    assert len(labels) == 3, labels


@pytest.mark.parametrize("label, spec", spec_params())
def test_head_has_no_gpu_and_workers_request_gpus(label, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0", label
    assert all(gpus(c) == 0 for c in head["template"]["spec"]["containers"]), f"{label}: the head requests a GPU"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{label}: no worker group requests {GPU}"
    for group in gpu_groups:
        for c in group["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            assert int(limits.get(GPU, 0)) >= 1, f"{label}: {GPU} must be in limits (Kubernetes schedules on limits)"
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations), f"{label}: GPU pods must tolerate the {GPU} taint"


@pytest.mark.parametrize("label, spec", spec_params())
def test_gpu_pods_are_whole_8_gpu_nodes_with_efa_for_nccl(label, spec):
    """DDP's gradients (~344 MB fp32 a step for a base student) go over NVLink inside a pod and
    over EFA between pods, not over pod sockets: 8 GPUs a pod, EFA devices, what NCCL needs."""
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            if gpus(c) == 0 or "teacher" in custom_resources(group):  # the teacher pool talks through Ray
                continue
            limits, env = c["resources"]["limits"], {e["name"]: e.get("value") for e in c.get("env", [])}
            assert gpus(c) == 8 and int(limits["vpc.amazonaws.com/efa"]) >= 1, f"{label}: {limits}"
            assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1", f"{label}: {env}"
            assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"], f"{label}: EFA pins memory"
            shm = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory", label


def custom_resources(group: dict) -> dict[str, float]:
    """A KubeRay group's custom Ray resources (``rayStartParams.resources``: JSON inside a YAML string)."""
    import json

    text = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(text)) if text else {}


def test_trainers_and_the_teacher_pool_have_node_groups_of_their_own():
    """The cluster configs' trainers ask for "trainer", the streamed teacher's actors for "teacher"; on
    KubeRay and AWS exactly the 8-GPU group offers the one and a smaller GPU group the other, so a
    teacher actor never takes a trainer's GPU (and the reverse)."""
    from pipelines.lib.pretrain.config import PretrainConfig
    from uta_core.config import load_config

    stream = load_config(PretrainConfig, ROOT / "configs/cluster/pretrain_stream.yaml")
    cache = load_config(PretrainConfig, ROOT / "configs/cluster/pretrain.yaml")
    assert stream.data.teacher_mode == "stream" and stream.stream.pool.gpus_per_actor == 1
    assert cache.cluster.worker_resources == stream.cluster.worker_resources == {"trainer": 1}
    assert stream.stream.pool.resources == {"teacher": 1} and stream.stream.pool.most_actors > stream.stream.pool.actors
    ((_, rc),) = objects_of("RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    offers = {name: custom_resources(g) for name, g in groups.items()}
    assert offers["gpu"] == {"trainer": 8} and offers["teacher"] == {"teacher": 4}, offers
    for name, resource in (("gpu", "trainer"), ("teacher", "teacher")):
        (container,) = groups[name]["template"]["spec"]["containers"]
        assert gpus(container) == offers[name][resource], f"{name}: one {resource} per GPU"
    types = aws()["available_node_types"]
    assert types["gpu_a100x8"]["resources"] == {"trainer": 8} and types["teacher_l4x4"]["resources"] == {"teacher": 4}
    assert types["teacher_l4x4"]["node_config"]["InstanceType"] == "g6.12xlarge"  # 4x L4
    readme = README.read_text()
    assert "## Sizing the teacher pool" in readme and "configs/cluster/pretrain_stream.yaml" in readme


def test_aws_8_gpu_nodes_have_efa_interfaces_in_a_placement_group():
    node = aws()["available_node_types"]["gpu_a100x8"]["node_config"]
    cards = node["NetworkInterfaces"]
    assert node["InstanceType"] == "p4d.24xlarge" and len(cards) == 4  # p4d: 4 network cards
    assert {n["NetworkCardIndex"] for n in cards} == {0, 1, 2, 3} and all(n["InterfaceType"] == "efa" for n in cards)
    assert all(n["SubnetId"] and n["Groups"] for n in cards) and node["Placement"]["GroupName"]


@pytest.mark.parametrize("label, spec", spec_params())
def test_ray_version_auth_dashboard_and_replica_bounds(label, spec):
    assert spec["rayVersion"] == ray_pin(), f"{label}: rayVersion {spec['rayVersion']} != pyproject pin {ray_pin()}"
    assert spec["authOptions"]["mode"] == "token", f"{label}: token auth must be on"
    # In a pod the dashboard must listen on the pod IP (README: "Auth and dashboard").
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= lo <= n <= hi and hi >= 1, f"{label}/{group['groupName']}: replicas {lo} <= {n} <= {hi} fails"


def test_long_lived_cluster_autoscales_from_zero():
    ((_, rc),) = objects_of("RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert any(g["minReplicas"] < g["maxReplicas"] for g in spec["workerGroupSpecs"])


def test_every_container_runs_the_one_project_image():
    image = project_image()
    seen = 0
    for path, obj in k8s_objects():
        for pod in pod_specs(obj):
            for c in pod["containers"] + pod.get("initContainers", []):
                assert c["image"] == image, f"{rel(path)}: {c['name']} runs {c['image']}, not {image}"
                seen += 1
    assert seen >= 7  # 3 heads, 3 GPU groups, MLflow


def test_dockerfile_and_build_script_define_that_image():
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)
    assert version == ray_pin(), f"Dockerfile builds on Ray {version}, pyproject pins {ray_pin()}"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M)
    build = (CLUSTER / "docker" / "build.sh").read_text()
    assert 'image="uta-pipelines:$version"' in build and "pyproject.toml" in build
    out = subprocess.run(
        ["sed", "-n", 's/^version = "\\(.*\\)"$/\\1/p', str(ROOT / "pyproject.toml")], capture_output=True, text=True
    ).stdout.split()
    assert out == [project_version()], "build.sh's sed does not find the project version"


def test_ray_pods_use_the_irsa_service_account():
    sas = {d["metadata"]["name"]: d for _, d in objects_of("ServiceAccount")}
    for sa in sas.values():
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for path, obj in [*objects_of("RayCluster"), *objects_of("RayJob"), *objects_of("Deployment")]:
        for pod in pod_specs(obj):
            assert pod.get("serviceAccountName") in sas, f"{rel(path)}: pod without an IRSA service account"


def test_long_lived_cluster_points_every_container_at_mlflow():
    ((_, rc),) = objects_of("RayCluster")
    for pod in pod_specs(rc):
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == mlflow_service_uri(), c["name"]


# ---------------------------------------------------------------------------- MLflow
def test_mlflow_server_takes_db_from_a_secret_and_artifacts_from_s3():
    ((_, dep),) = objects_of("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert "value" not in env["MLFLOW_BACKEND_STORE_URI"], "the DB URL (with its password) must come from a Secret"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert not objects_of("Secret"), "Secrets are created by hand (README), never committed"
    script = c["command"][-1]
    assert script.startswith(docker_workdir() + "/") and (ROOT / script.removeprefix(docker_workdir() + "/")).is_file()


def test_mlflow_allowed_hosts_admit_the_uri_jobs_use():
    ((_, dep),) = objects_of("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    allowed = [h.strip() for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS" for h in e["value"].split(",")]
    host = urlparse(mlflow_service_uri()).netloc  # the Host header a client sends
    # MLflow's own rule: exact match, or fnmatch when the entry has a '*'.
    assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), (host, allowed)
    assert any(fnmatch.fnmatch("localhost:5000", a) for a in allowed if "*" in a), "port-forward UI access"


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "MLFLOW_BACKEND_STORE_URI is not set"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/m"}, "MLFLOW_ARTIFACTS_DESTINATION is not set"),
        ({"MLFLOW_BACKEND_STORE_URI": "sqlite:///mlflow.db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/p"}, "postgresql://"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/m", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a"}, "s3://"),
    ],
)
def test_mlflow_server_script_refuses_missing_or_wrong_settings(env, message):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        ["bash", str(CLUSTER / "mlflow" / "server.sh")], env={**base, **env}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "pw@" not in proc.stderr + proc.stdout, "server.sh must never print the database password"


@pytest.mark.parametrize("how", ["file", "env"])
def test_mlflow_server_script_listens_on_loopback_and_keeps_the_password_off_the_command_line(tmp_path, how):
    """A stand-in ``mlflow`` records its argv and the backend URL it reads from its environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/argv"\n'
                                    'printf "%s" "$MLFLOW_BACKEND_STORE_URI" > "$OUT/backend"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\n[ "$2" = "import psycopg2" ] && exit 0\nexec {sys.executable} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    secret = "p@ss word/1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(tmp_path), MLFLOW_BACKEND_STORE_URI="postgresql://mlflow@db:5432/m",
               MLFLOW_ARTIFACTS_DESTINATION="s3://b/p", MLFLOW_APP_NAME="basic-auth")
    if how == "file":
        (tmp_path / "pw").write_text(secret + "\n")
        env["MLFLOW_DB_PASSWORD_FILE"] = str(tmp_path / "pw")
    else:
        env["MLFLOW_DB_PASSWORD"] = secret
    proc = subprocess.run(["bash", str(CLUSTER / "mlflow" / "server.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "basic-auth" in argv
    assert "p@ss" not in " ".join(argv) and "p@ss" not in proc.stdout + proc.stderr
    assert (tmp_path / "backend").read_text() == "postgresql://mlflow:p%40ss%20word%2F1@db:5432/m"


# ------------------------------------------------------------------------------- AWS
def test_aws_config_passes_the_launchers_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws()))


def test_aws_every_node_type_uses_an_instance_profile():
    for name, node in aws()["available_node_types"].items():
        profile = node["node_config"]["IamInstanceProfile"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")), name


def test_no_aws_keys_anywhere_in_cluster_files():
    files = [p for p in [*CLUSTER.rglob("*"), *(ROOT / "configs" / "cluster").glob("*")] if p.is_file()]
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{rel(path)} contains {pattern.pattern!r}: use IAM roles, not keys"


def test_aws_gpu_workers_are_spot_and_the_head_is_a_cpu_node():
    cfg = aws()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "a spot head takes the whole cluster down with it"
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head must be a CPU instance"
    assert "GPU" not in head["resources"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), f"{name} is not a GPU instance type"
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["cache_stopped_nodes"] is False


def test_aws_start_commands_use_token_auth_and_a_loopback_dashboard():
    cfg = aws()
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head and "--num-cpus=0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd and "--disable-usage-stats" in cmd
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node needs the same token"
    assert cfg["file_mounts"]["~/uta"] == "."


def test_aws_setup_installs_the_project_and_sets_the_region():
    cfg = aws()
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install .*-e ~/uta\b", setup)
    region = cfg["provider"]["region"]
    assert f"AWS_DEFAULT_REGION={region}" in setup and cfg["provider"]["availability_zone"].startswith(region)


# ----------------------------------------------------------------------- shell scripts
SCRIPTS = sorted(CLUSTER.rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_shell_scripts_parse_and_are_strict(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{rel(script)} is not executable"


def test_local_start_binds_the_dashboard_to_loopback_with_token_auth():
    script = CLUSTER / "local" / "start.sh"
    lines = re.sub(r"\\\n\s*", " ", script.read_text()).splitlines()
    (start,) = [ln for ln in lines if re.match(r"\s*(nohup\s+)?ray start ", ln)]
    argv = shlex.split(start.replace('"${gpu_args[@]}"', ""))
    assert "--head" in argv and "--block" in argv and "--disable-usage-stats" in argv
    assert argv[argv.index("--dashboard-host") + 1] == "127.0.0.1"
    assert "--num-cpus" in argv
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text and "0.0.0.0" not in text
    assert "ray job submit --address http://127.0.0.1:" in text, "start.sh must print the submit command"


def test_local_stop_never_runs_ray_stop():
    text = (CLUSTER / "local" / "stop.sh").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "ray stop" not in code and "kill -TERM" in code, "stop only the cluster start.sh recorded"


# ------------------------------------------------------- the local cluster, for real
def checkout_with_outputs(folder: Path) -> Path:
    """A copy of this checkout's code after some use: outputs and data next to the code."""
    for name in ("uta_core", "pipelines", "configs", "tune_spaces"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".rayignore", "pyproject.toml"):
        shutil.copy(ROOT / name, folder / name)
    planted = {"data/shards/00000.tar": 24, "mlartifacts/1/abc/artifacts/export/model.safetensors": 8,
               "runs/uta-local/checkpoint_000001/state.pt": 8, "outputs/cache/shards/00000.parquet": 4,
               "mlflow.db": 2, "shards.parquet": 2}
    for rel, mib in planted.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(mib << 20))
    return folder


def uploaded_mib(submit_output: str) -> float:
    """What the job found in its working directory (the unpacked upload): ``uploaded-kib N``."""
    match = re.search(r"uploaded-kib (\d+)", submit_output)
    assert match, submit_output[-3000:]
    return int(match.group(1)) / 1024


def sigkill_driver(script: str, marker: str) -> list[int]:
    """SIGKILL the driver of a submitted job (the processes running ``script`` whose arguments hold
    ``marker``, not the ``ray job submit`` client), as an OOM kill would; the cluster stays."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if script in args and marker in args and "job submit" not in args:
            os.kill(int(cmdline.parent.name), signal.SIGKILL)
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_local_cluster_needs_the_token_and_a_sigkilled_driver_resumes_on_resubmit(tmp_path):
    """The README's way to run a job: cluster/local/start.sh, then ``ray job submit``. A job
    without the token is refused. From a checkout holding outputs and data the upload leaves them
    behind, and a relative output path is refused (it would land in the upload, which Ray
    deletes). With absolute paths the pre-training runs; its driver is SIGKILLed after the
    checkpoint of step 2 (the cluster lives on), and the resubmitted job resumes from the newest
    checkpoint in the same MLflow run, to the end. (A SIGKILLed worker: tests/test_pretrain.py, on
    S3; a killed caching job: tests/test_reliability.py.)"""
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI is not on PATH")
    token = tmp_path / "token"
    token.write_text("uta-test-" + os.urandom(16).hex())
    dash = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "RAY_AUTH_TOKEN_PATH": str(token),  # never touch the user's ~/.ray/auth_token
        "UTA_RAY_STATE_DIR": str(tmp_path / "state"),
        "UTA_RAY_PORT": str(free_port()),
        "UTA_RAY_DASHBOARD_PORT": str(dash),
        "UTA_RAY_CLIENT_PORT": str(free_port()),
        "UTA_RAY_NUM_CPUS": "4",  # the job: a worker at 0.5 CPU + room for Ray Data on 2 cores
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    used = checkout_with_outputs(tmp_path / "checkout")  # 48 MiB of outputs and data

    def run(*cmd: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=540)

    def submit_cmd(*entrypoint: str) -> list[str]:
        return ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(used), "--",
                *entrypoint]

    def submit(*entrypoint: str, **extra: str) -> subprocess.CompletedProcess:
        return run(*submit_cmd(*entrypoint), **extra)

    inputs = tmp_path / "inputs"  # absolute paths: outputs outside the upload
    args = [*pretrain_overrides(inputs), "run.name=faults", "train.max_steps=8", "run.checkpoint_every=2",
            "run.log_every=1", "cluster.num_workers=1"]  # one worker: the trial is about the driver
    started = run("bash", str(CLUSTER / "local" / "start.sh"))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{dash}" in started.stdout and "export RAY_AUTH_MODE=token" in started.stdout
        if shutil.which("ss"):
            listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{dash} " in listening and f"0.0.0.0:{dash} " not in listening
        bare = submit("python", "-c", "print(42)")
        assert bare.returncode != 0 and "Unauthorized" in bare.stdout + bare.stderr
        entrypoint = ("echo uploaded-kib $(du -sk . | cut -f1); "
                      "exec python pipelines/pretrain.py 'data.input.paths=/nonexistent/*.tar'")
        job = submit("bash", "-c", entrypoint, RAY_AUTH_MODE="token")  # Ray quotes each word
        text = job.stdout + job.stderr
        assert uploaded_mib(text) < 2.0  # the code only
        assert job.returncode != 0 and "error: run.storage_path='runs' is inside this job's uploaded working" in text
        assert "Traceback" not in text
        log = tmp_path / "killed.log"
        with log.open("wb") as out:
            client = subprocess.Popen(submit_cmd("python", "pipelines/pretrain.py", *args),
                                      env={**env, "RAY_AUTH_MODE": "token"}, stdout=out, stderr=subprocess.STDOUT)
        try:
            checkpoint = inputs / "runs" / "faults" / "checkpoint_0000002" / "state.pt"
            deadline = time.monotonic() + 300
            while not checkpoint.is_file():
                assert client.poll() is None, f"the job ended before step 2's checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint of step 2 in 300 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)
            assert sigkill_driver("pipelines/pretrain.py", "run.name=faults"), "no driver process found"
            assert client.wait(timeout=120) != 0
        finally:
            if client.poll() is None:
                client.kill()
        killed_status = pretrain_run(f"sqlite:///{inputs / 'mlflow.db'}", "faults")[1].info.status
        resubmitted = submit("python", "pipelines/pretrain.py", *args, RAY_AUTH_MODE="token")
        logs = resubmitted.stdout + resubmitted.stderr
        assert resubmitted.returncode == 0 and "succeeded" in logs, logs[-4000:]
        # The job's console, as `ray job submit` shows it: our progress line and where the runs are;
        # Ray's internals stay in the cluster's log files.
        assert re.search(r"pretrain faults: 100%\|[^\n]*\| 8/8 \[[0-9:]+<00:00, [^\]]+\] loss -?[0-9.]+", logs), logs
        assert "?workflowType=machine_learning" in logs and "Ray worker logs: " in logs
        for noise in ("TrainingReport(", "Execution plan", "Checkpoint successfully created", "Parsing model"):
            assert noise not in logs, noise
    finally:
        stopped = run("bash", str(CLUSTER / "local" / "stop.sh"))
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "state" / "ray-head.pid").exists()
    assert "Draining" not in (tmp_path / "state" / "ray-head.log").read_text()  # no 30 s drain on one machine
    assert killed_status in ("RUNNING", "FAILED")  # killed: left running, or ended by its dying worker
    client, mlrun = pretrain_run(f"sqlite:///{inputs / 'mlflow.db'}", "faults")  # the resumed job's: the same run
    assert mlrun.info.status == "FINISHED" and 2 <= int(mlrun.data.tags["uta.resumed_from_step"]) < 8
    assert {m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")} == set(range(1, 9))
    assert "zeroshot_top1" in mlrun.data.metrics
    final = checkpoint_state(str(inputs / "runs"), "faults", 8)
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {8}  # AdamW never restarted
    student, meta = load_export(inputs / "runs" / "faults" / "export")
    assert meta["step"] == 8 and student.grid == (8, 8)


@pytest.mark.parametrize("key", ["RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"])
def test_every_ray_start_sets_the_process_environment_of_a_local_ray(key):
    """Each way this project starts Ray sets what pipelines/lib/ray_setup.py sets for a local Ray
    (the stale resource requests' expiry, Ray Train's look at its workers)."""
    from pipelines.lib.ray_setup import RAY_PROCESS_ENV

    value = RAY_PROCESS_ENV[key]
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ENV {key}={value}$", dockerfile, re.M), "the image (KubeRay pods, MLflow) lacks it"
    start = (CLUSTER / "local" / "start.sh").read_text()
    assert f'export {key}="${{{key}:-{value}}}"' in start
    aws = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws[section] if "ray start" in c]
        assert starts and all(f"{key}={value}" in c.split("ray start")[0] for c in starts), section

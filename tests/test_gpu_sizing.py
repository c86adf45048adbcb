"""Teacher pools and sweep concurrency come from the config and wait for the autoscaler's GPUs,
not from the GPUs present when the job starts. A real local Ray that declares logical GPUs
(no physical one) plays the GPU cluster; one with none plays a cluster whose GPU nodes scale
from zero. Each runs in its own process (the suite's Ray has no GPUs)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys, time
    import ray
    from pipelines.lib.cache.config import CacheConfig
    from pipelines.lib.cache.job import ResourceError, compute_resources, gpu_pool, resolve_device
    from pipelines.lib.cli import setup_logging
    from pipelines.lib.pretrain.config import PretrainConfig
    from pipelines.lib.ray_setup import start_local_ray
    from pipelines.lib.sweep.search_space import SearchSpace
    from pipelines.lib.sweep.tune import concurrent_trials
    from uta_core.config import from_dict

    gpus = float(sys.argv[1])
    setup_logging()  # the jobs' console: our stages at INFO
    print(f"RAY-WITH-GPUS {gpus}", file=sys.stderr, flush=True)
    start_local_ray(num_cpus=8, num_gpus=gpus)

    def cache(**ray_cfg):
        return from_dict(CacheConfig, {"input": {"paths": ["x"]}, "output": {"path": "y"}, "teacher_random_seed": 0,
                                       "ray": ray_cfg})

    def trials(space=None, cli=None, **cluster):
        cfg = from_dict(PretrainConfig, {"data": {"input": {"paths": ["x"]}}, "teacher_random_seed": 0,
                                         "cluster": cluster})
        space = space or SearchSpace(num_samples=3, params={"mask.mask_ratio": {"grid": [0.3, 0.5]}})
        return concurrent_trials(cfg, space, cli)

    # ray.address set: a cluster the job joined (only resolve_device reads it here).
    out = {"auto": resolve_device(cache()), "auto_joined": resolve_device(cache(address="ray://head:10001"))}
    out["pool_default"] = list(gpu_pool(cache(device="cuda"))) if gpus else None
    out["pool_config"] = list(gpu_pool(cache(device="cuda", num_actors=8, actor_num_cpus=2.0))) if gpus else None
    out["cpu_pool"] = list(compute_resources(cache(device="cpu"), "cpu"))
    start = time.monotonic()
    try:
        gpu_pool(cache(device="cuda", gpu_wait_s=1.5))
        out["wait"] = None
    except ResourceError as err:
        out["wait"] = [str(err), time.monotonic() - start]
    out["trials_gpu"] = trials(use_gpu=True, num_workers=2, cpus_per_worker=1, data_cpus=1)
    out["trials_space"] = trials(SearchSpace(max_concurrent_trials=5, params={"mask.mask_ratio": {"grid": [0.5]}}),
                                 use_gpu=True, num_workers=2)
    out["trials_cli"] = trials(cli=2, use_gpu=True, num_workers=2)
    out["trials_cpu"] = trials(use_gpu=False, num_workers=1, cpus_per_worker=1, data_cpus=1)
    ray.shutdown()
    print(f"RESULT {gpus} " + json.dumps(out), flush=True)
''')
GPU_COUNTS = (4, 0)


@pytest.fixture(scope="module")
def sized() -> dict[int, dict]:
    """Both Rays in one process, one after the other (the imports once): GPU count -> results and log."""
    loop = "import sys\nfor sys.argv[1:] in " + repr([[str(g)] for g in GPU_COUNTS]) + ":\n" + \
        textwrap.indent(SCRIPT, "    ")
    proc = subprocess.run([sys.executable, "-c", loop], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = dict(zip(GPU_COUNTS, proc.stderr.split("RAY-WITH-GPUS ")[1:]))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            gpus, data = line[len("RESULT "):].split(" ", 1)
            results[int(float(gpus))] = {"log": logs[int(float(gpus))], **json.loads(data)}
    return results


@pytest.mark.timeout(300)
def test_a_cluster_with_gpus_sizes_pools_from_the_config_and_its_gpus(sized):
    out = sized[4]
    assert out["auto"] == out["auto_joined"] == "cuda"
    assert out["pool_default"] == [4, 1.0, 1]  # one actor per GPU present, 1 CPU, 1 thread
    assert out["pool_config"] == [8, 2.0, 2]  # the config's 8 actors although 4 GPUs are there now
    assert out["wait"] is None  # GPUs present: no wait
    assert out["trials_gpu"] == 2  # min(4 GPUs / 2 a trial, 8 CPUs / (2 workers + 1 data CPU))
    assert out["trials_space"] == 5 and out["trials_cli"] == 2


@pytest.mark.timeout(300)
def test_a_cluster_scaling_gpus_from_zero_waits_for_them_and_runs_every_trial(sized):
    out = sized[0]
    assert out["auto"] == "cpu"  # a local Ray without GPUs: the CPU, as before
    assert out["auto_joined"] == "cpu" and "set ray.device=cuda: the job then asks the autoscaler" in out["log"]
    message, waited = out["wait"]
    assert "teacher actors: no GPU joined the Ray cluster in 1.5 s" in message
    assert "requested 1 x {'GPU': 1.0, 'CPU': 1.0}" in message and "ray.device=cpu" in message
    assert 1.5 <= waited < 30
    assert "waiting for GPU nodes" in out["log"]  # what the job says while it waits
    assert out["trials_gpu"] == 6  # 2 grid points x 3 samples, all at once: the autoscaler's demand
    assert "letting the autoscaler add GPU nodes" in out["log"]
    assert out["trials_space"] == 5 and out["trials_cli"] == 2
    assert out["trials_cpu"] == 3  # 8 CPUs / (1 worker CPU + 1 data CPU + 0.01 for the trial itself)
    assert out["cpu_pool"][0] == 1

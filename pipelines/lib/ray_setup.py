"""Connect to a Ray cluster or start a small local one, set up as a ``ray start`` cluster would be."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import ray

from pipelines.lib.native_stderr import drop_known_lines

log = logging.getLogger("uta.ray")

# Ray Data (the caching job) and Ray Train share a cluster through one coordinator actor that
# hands out CPUs by request; requests expire unless renewed (live ones renew every 10 s). A
# job killed mid-way leaves its requests behind, and by default they hold their CPUs for 180 s:
# on a small cluster the next job's Ray Data is granted 0 CPUs and waits at 0 rows for those
# minutes. A 30 s expiry bounds that wait.
# Ray Train's controller looks at its workers every 2 s by default, and every ray.train.report
# (checkpoints, evaluations) waits for that look: 2 s a report, and ~5 s from the last step to
# the end of fit() (measured with a no-op TorchTrainer). Every 0.5 s costs the controller a few
# RPCs more and the run 0.5 s a report.
# Ray reads both when a process starts, so they must be in the environment of every Ray process
# (the image and `ray start` set them too).
RAY_PROCESS_ENV = {"RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "30", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Ray's workers print Ray Train's and Ray Data's internals and library chatter; the console shows
# our stages and progress instead, and the worker output stays in the session's log files.
# UTA_WORKER_LOGS=console streams it to the driver as Ray does by default.
WORKER_LOGS_ENV = "UTA_WORKER_LOGS"


def worker_logs_to_console() -> bool:
    return os.environ.get(WORKER_LOGS_ENV, "files") == "console"


class _NotOurBars(logging.Filter):
    """Ray Data warns that its progress bars are off: the jobs draw their own (pipelines/lib/progress.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_console() -> None:
    """Ray Data's INFO lines (execution plans, "finished in") go to its log file only, not the console."""
    import ray.data  # noqa: F401  (configures the ray.data logger)

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _NotOurBars) for f in handler.filters):
                handler.addFilter(_NotOurBars())


def announce_logs() -> None:
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # no public accessor in Ray 2.60
    except AttributeError:
        logs = "/tmp/ray/session_latest/logs on each node"
    if not worker_logs_to_console():
        log.info("Ray worker logs: %s (%s=console prints them here)", logs, WORKER_LOGS_ENV)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             resources: dict[str, float] | None = None, *, cpus_setting: str | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as ``ray job submit`` sets it), else start a
    local Ray (``start_local_ray``) of ``num_cpus``. Returns True when this call started Ray (so the
    caller shuts it down); an already initialised Ray (tests, notebooks) is reused as it is.
    ``cpus_setting``: the key the user set ``num_cpus`` with, warned about when a cluster ignores it
    (a size the job computed for a local Ray is not the user's, and is dropped silently).
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None and cpus_setting:
            log.warning("%s=%s is ignored when connecting to a running cluster", cpus_setting, num_cpus)
        # logging_level: Ray's "Connecting to existing Ray cluster" / "Connected" INFO lines stay off the console
        ray.init(address=address, log_to_driver=worker_logs_to_console(), logging_level=logging.WARNING)
        quiet_ray_console()
        announce_logs()
        drop_known_lines()
        return True
    start_local_ray(num_cpus, resources=resources)
    drop_known_lines()
    return True


def start_local_ray(num_cpus: int | None, **init_kwargs) -> None:
    """A new single-node Ray with its dashboard on localhost, set up like a ``ray start`` cluster.

    Ray Train removes the placement group of a run whose controller died without shutting
    down (a Tune trial that ASHA stops) from a watcher actor that asks the dashboard's state
    API whether the controller still lives. In a Ray started by ``ray.init`` that watcher finds
    neither the dashboard nor the cluster, so the placement group, with its CPUs, leaks until
    the driver exits and the next trial's read tasks wait for a CPU forever. Hence: a dashboard,
    on a port chosen here, whose address every Ray process inherits (RAY_API_SERVER_ADDRESS).
    """
    port = free_port()
    for key, value in RAY_PROCESS_ENV.items():  # a local Ray's processes inherit this environment
        os.environ.setdefault(key, value)
    put_project_on_pythonpath()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local": never attach silently to a `ray start` cluster left over on this machine.
    init_kwargs.setdefault("log_to_driver", worker_logs_to_console())
    init_kwargs.setdefault("logging_level", logging.WARNING)  # our own line below says where it is
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, **init_kwargs)
    quiet_ray_console()
    url = context.dashboard_url or ""
    if not url.endswith(f":{port}"):
        log.warning("the Ray dashboard is not on port %s (%r): placement groups of stopped Tune trials "
                    "may not be released", port, url)
    else:
        log.info("local Ray with %s CPUs, dashboard http://%s", num_cpus or os.cpu_count(), url)
    announce_logs()


def put_project_on_pythonpath() -> None:
    """Every process of a local Ray imports this checkout's code, whatever the driver's working
    directory (Ray itself adds only the driver's script folder and cwd to its workers' path)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def connected_to_cluster(address: str | None) -> bool:
    """True when the job runs on a cluster it did not start (an address, or ``ray job submit``)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def await_gpus(bundles: list[dict[str, float]], timeout_s: float, what: str, poll_s: float = 10.0) -> None:
    """Ask Ray's autoscaler for ``bundles`` and wait until the cluster holds at least one GPU.

    Clusters shipped here scale their GPU nodes from zero: a job starts on the head, which has
    no GPU. Sizing a pool from the GPUs present at start would refuse to run (or pick the CPU)
    there; instead the request (``ray.autoscaler.sdk.request_resources``, which a cluster
    without an autoscaler ignores) brings the nodes, and this says what it waits for. Returns
    once a GPU is there; raises ``TimeoutError`` after ``timeout_s``.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)  # the whole pool: the cluster grows to it while the job runs
    start = time.monotonic()
    shape = f"{len(bundles)} x {bundles[0]}" if bundles else "nothing"
    while cluster_resources()[1] < 1:
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise TimeoutError(
                f"{what}: no GPU joined the Ray cluster in {timeout_s:g} s (requested {shape} from the autoscaler). "
                "Check the cluster's GPU node group (max replicas, instance quota, pending pods: `ray status`), "
                "or run on CPUs with ray.device=cpu")
        log.info("%s: waiting for GPU nodes, requested %s from the autoscaler; the cluster has none yet (%.0f s)",
                 what, shape, waited)
        time.sleep(min(poll_s, max(0.1, timeout_s - waited)))


def release_resource_request() -> None:
    """Withdraw this job's autoscaler request, so idle GPU nodes can scale back down."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])

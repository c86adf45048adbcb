"""Ray plumbing shared by the pipelines: connect to a cluster or start a small local one."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train

log = logging.getLogger("uta.ray")

# Ray Data and Ray Train share a cluster through one coordinator actor that hands out CPUs by
# request; requests expire unless renewed (live ones renew every 10 s). A Tune trial stopped
# early (ASHA) is killed without cancelling its requests, and by default they hold their
# CPUs for 180 s: on a small cluster the next trial's Ray Data is granted 0 CPUs and waits at
# 0 rows for those minutes. A 30 s expiry bounds that wait. Ray reads it when a worker starts,
# so it must be in the environment of every Ray process (the image and `ray start` set it too).
RAY_PROCESS_ENV = {"RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "30"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as ``ray job submit`` sets it), else start a
    local Ray (``start_local_ray``). Returns True when this call started Ray (so the caller
    shuts it down); an already initialised Ray (tests, notebooks) is reused as it is.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            log.warning("ray.num_cpus=%s is ignored when connecting to a running cluster", num_cpus)
        ray.init(address=address)
        return True
    start_local_ray(num_cpus)
    return True


def start_local_ray(num_cpus: int | None, **init_kwargs) -> None:
    """A new single-node Ray with its dashboard on localhost, set up like a ``ray start`` cluster.

    Ray Train removes the placement group of a run whose controller died without shutting
    down (a Tune trial that ASHA stops) from a watcher actor that asks the dashboard's state
    API whether the controller still lives. In a Ray started by ``ray.init`` that watcher finds
    neither the dashboard nor the cluster, so the placement group, with its CPUs, leaks until
    the driver exits and the next trial's Ray Data waits at 0 rows forever. Hence: a dashboard,
    on a port chosen here, whose address every Ray process inherits (RAY_API_SERVER_ADDRESS).
    """
    port = free_port()
    for key, value in RAY_PROCESS_ENV.items():  # a local Ray's processes inherit this environment
        os.environ.setdefault(key, value)
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local": never attach silently to a `ray start` cluster left over on this machine.
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, **init_kwargs)
    url = context.dashboard_url or ""
    if not url.endswith(f":{port}"):
        log.warning("the Ray dashboard is not on port %s (%r): placement groups of stopped Tune trials "
                    "may not be released", port, url)
    else:
        log.info("local Ray with %s CPUs, dashboard http://%s", num_cpus or os.cpu_count(), url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


# --------------------------------------------------------------------- command lines
def job_parser(doc: str, default_config: Path, smoke_help: str, example: str) -> argparse.ArgumentParser:
    """The command line every job shares: ``[--config YAML] [--smoke-test] [key=value ...]``."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("--config", type=Path, default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--smoke-test", action="store_true", help=smoke_help)
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    return parser


def setup_logging() -> None:
    """Warnings from libraries, progress from our own ``uta.*`` loggers."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uta").setLevel(logging.INFO)


def start_job(args: argparse.Namespace, smoke_overrides: Callable[[Path], list[str]], job: str) -> list[str]:
    """Logging, then the command's overrides; ``--smoke-test`` prepends generated inputs in a temp folder."""
    setup_logging()
    overrides = list(args.overrides)
    if args.smoke_test:
        workdir = Path(tempfile.mkdtemp(prefix=f"uta-{job}-smoke-"))
        print(f"smoke test in {workdir}")
        overrides = smoke_overrides(workdir) + overrides
    return overrides


def run_training_job(
    config_cls: type, args: argparse.Namespace, overrides: list[str], run: Callable, report: Callable
) -> int:
    """Load the config, run the job, print its report. Exit codes: 0 done; 2 a user error
    (config, paths, mismatched inputs: one line, no traceback); 1 training failed."""
    from uta_core.config import load_config

    try:
        cfg = load_config(config_cls, args.config, overrides)
        result = run(cfg)
    except ValueError as err:
        return user_error(err)
    except ray.train.TrainingFailedError as err:
        return user_error(f"training failed: {err}", code=1)
    report(result)
    return 0


def user_error(message: object, code: int = 2) -> int:
    """A mistake the user can fix (config, paths, credentials): one line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    return code

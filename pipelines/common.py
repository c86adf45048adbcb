"""Ray plumbing shared by the pipelines: connect to a cluster or start a small local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("uta.ray")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as ``ray job submit`` sets it), else start a
    local Ray without a dashboard. Returns True when this call started Ray (so the caller
    shuts it down); an already initialised Ray (tests, notebooks) is reused as it is.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            log.warning("ray.num_cpus=%s is ignored when connecting to a running cluster", num_cpus)
        ray.init(address=address)
        return True
    # "local": never attach silently to a `ray start` cluster left over on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))

"""Where a job may write, checked on the driver before Ray starts or an MLflow run opens.

``ray job submit --working-dir DIR`` runs the entrypoint in an unpacked copy of DIR inside the
Ray session's temporary folder, and Ray deletes that copy with the session. A relative output
path (``runs``, ``outputs/cache``, the default ``./mlflow.db``) would resolve into it: the job
would report success and its outputs would vanish. Such paths are refused, with the fix:
an absolute path on storage every node can reach, or ``s3://``. Outside a submitted job,
relative paths are relative to the working directory, as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs

from uta_core import tracking
from uta_core.data.storage import check_local_output, is_s3

# Ray's job supervisor gives the entrypoint its job config, runtime_env included, in this variable.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def uploaded_working_dir() -> Path | None:
    """The job's temporary working folder if this process is the entrypoint of a ``ray job
    submit`` with a ``working_dir``; None otherwise."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def check_output(key: str, path: str, *, file: bool = False) -> None:
    """Refuse an output folder (``file``: an output file) the job would lose, or that cannot be
    created (a file in the way, no write permission)."""
    if is_s3(path):
        return
    resolved = _absolute(path)
    if _in_job_dir(resolved):
        raise ValueError(f"{key}={path!r} is inside {_LOST}; give an absolute path on storage every node "
                         "can reach, or an s3:// URI")
    check_local_output(pafs.LocalFileSystem(), str(resolved.parent if file else resolved), key)


def check_tracking(cfg: tracking.TrackingConfig) -> None:
    """The MLflow URI carries no password (from config or environment), and a SQLite store is a
    file the job may write and keep."""
    if not cfg.enabled:
        return
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    if not uri.startswith("sqlite:///"):
        return  # a tracking server
    if cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        key = "tracking.tracking_uri" if cfg.tracking_uri else "MLFLOW_TRACKING_URI"
        check_output(key, uri.removeprefix("sqlite:///"), file=True)
    elif _in_job_dir(_absolute(uri.removeprefix("sqlite:///"))):
        raise ValueError(f"MLflow's default store ./mlflow.db would be inside {_LOST}; set MLFLOW_TRACKING_URI "
                         "(or tracking.tracking_uri) to a tracking server or to sqlite:////<shared folder>/mlflow.db")


_LOST = "this job's uploaded working directory, which Ray deletes when the job ends"


def _absolute(path: str) -> Path:
    resolved = Path(path).expanduser()
    return (resolved if resolved.is_absolute() else Path.cwd() / resolved).resolve()


def _in_job_dir(resolved: Path) -> bool:
    job_dir = uploaded_working_dir()
    return job_dir is not None and (resolved == job_dir or job_dir in resolved.parents)

"""MLflow helpers shared by the pipelines: one place decides the URI, the run, what is logged.

The tracking URI is ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (MLflow 3 refuses the old ``./mlruns`` file store). For a
SQLite backend, artefacts of new experiments go next to the database
(``<db folder>/mlartifacts``) instead of the current directory. Parameters pass through
``redact_params``: keys that look secret are dropped and ``user:password@`` in URLs is
masked, so credentials never reach MLflow. Log from rank 0 / the driver only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uta_core.config import flatten, to_dict
from uta_core.secrets import has_userinfo, is_secret_key, redact_urls

_MAX_PARAM_CHARS = 6000  # MLflow's limit for a parameter value


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None: the pipeline's own (e.g. uta-cache)
    run_name: str | None = None
    parent_run_id: str | None = None  # nest this run under another (a sweep's trials under the sweep)
    log_model: bool = True  # training runs: log the final student as an MLflow model (mlflow.pytorch)
    register_as: str | None = None  # ... and register it under this name (a new version each run)
    system_metrics: bool = True  # training runs: MLflow's system metrics (CPU, memory, disk, network, GPU)

    def __post_init__(self) -> None:
        if self.experiment == "":
            raise ValueError("experiment must be a non-empty MLflow experiment name (or null)")
        if self.tracking_uri is not None:
            _refuse_userinfo(self.tracking_uri, "tracking.tracking_uri")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow URI a job uses; refuses one that embeds a password (from config or environment)."""
    if uri:
        _refuse_userinfo(uri, "tracking.tracking_uri")
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        _refuse_userinfo(env, "MLFLOW_TRACKING_URI")
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _refuse_userinfo(uri: str, where: str) -> None:
    if has_userinfo(uri):  # MLflow would print it in its logs and error messages
        raise ValueError(
            f"{where}={redact_urls(uri)!r} embeds user:password; pass the URL without it and the "
            "credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
        )


def _artifact_location(uri: str, experiment: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent / "mlartifacts" / experiment).as_uri()


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flat params -> MLflow-safe strings, without secret-looking keys or URL credentials."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key):
            continue
        text = redact_urls(str(value))
        out[key] = text[:_MAX_PARAM_CHARS]
    return out


@contextlib.contextmanager
def start_run(
    cfg: TrackingConfig, default_experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
    source: str | None = None, system_metrics: bool = False, run_id: str | None = None,
) -> Iterator[Any]:
    """``with start_run(cfg, "uta-cache", source="pipelines/cache_teacher.py") as run:`` -> an active
    MLflow run, or None when tracking is off. ``source`` is the run's "Source" in the UI (MLflow
    would name the process's script: Ray's ``default_worker.py`` in a training worker). ``system_metrics``:
    MLflow samples this machine's CPU, memory, disk, network (and GPUs) into the run every 10 s. ``run_id``:
    continue that run (a resumed sweep's parent) instead of starting one."""
    if not cfg.enabled:
        yield None
        return
    import mlflow

    uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    name = cfg.experiment or default_experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=_artifact_location(uri, name))
    else:
        experiment_id = experiment.experiment_id
    tags = dict(tags or {})
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id  # MLflow's own nesting tag
    if source:
        tags.setdefault("mlflow.source.name", source)
        tags.setdefault("mlflow.source.type", "JOB")
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name or cfg.run_name, tags=tags,
                          log_system_metrics=system_metrics) as run:
        yield run


def leave_run() -> None:
    """Let go of this process's active MLflow run without ending it (its status stays as it is): a job that
    lost its output to another job must not end the run that job now continues. MLflow has no public call
    for it; this is ``end_run`` without its ``set_terminated``."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        fluent.MLFLOW_RUN_ID.unset()
        stack.pop()


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
ML_VIEW = "?workflowType=machine_learning"  # MLflow 3 opens an experiment in its GenAI view without it


def ui_link(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI page of a run (or of an experiment's run table), in the model-training view."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    if experiment_id is None:
        return f"{base}/#/experiments{ML_VIEW}"
    page = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return base + page + ML_VIEW


def where_runs_are(tracking_uri: str, run_id: str | None = None, experiment: str | None = None) -> str:
    """Lines a job ends with: where its MLflow runs are, the command that opens them, the page."""
    uri = redact_urls(tracking_uri)
    experiment_id = None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        if run_id:
            experiment_id = client.get_run(run_id).info.experiment_id
        elif experiment:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else None
    except Exception:  # the links are a convenience: a store that cannot be read now is no error
        pass
    lines = [f"MLflow: {uri}" + (f" (run {run_id})" if run_id else "")]
    if not tracking_uri.startswith(("http://", "https://")):
        lines.append(f"  open it:  mlflow ui --backend-store-uri {uri}   (here: ./uta python -m mlflow ui ...)")
    lines.append(f"  then:     {ui_link(tracking_uri, experiment_id, run_id)}")
    return "\n".join(lines)


def log_config(cfg: Any) -> None:
    """Log a dataclass config as flattened, redacted params (no-op without an active run)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_params(redact_params(flatten(to_dict(cfg))))


def log_metrics(metrics: Mapping[str, float]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_json(data: Mapping[str, Any], artifact_file: str) -> None:
    """Log a dict as a JSON artefact (e.g. a cache manifest)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_dict(dict(data), artifact_file)


def log_artifacts(paths: Sequence[str | Path]) -> None:
    """Log local files as artefacts at the run's root."""
    import mlflow

    if mlflow.active_run() is not None:
        for path in paths:
            mlflow.log_artifact(str(path))


def log_table(table: Mapping[str, list], artifact_file: str) -> None:
    """Log columns of equal length as an MLflow table artefact (shown as a table in the UI)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_table(data=dict(table), artifact_file=artifact_file)


def end_killed_runs(tracking_uri: str, experiment: str, run_name: str, status: str, tags: Mapping[str, str],
                    parent_run_id: str | None = None) -> int:
    """Tag the runs named ``run_name`` in ``experiment`` (children of ``parent_run_id`` if given); end those
    still RUNNING with ``status``.

    A process that is killed (a sweep trial stopped early, a crashed worker) cannot end its own
    run, which would otherwise show as running forever. One that outruns the kill and ends its
    run itself keeps its own status (FINISHED). Returns how many runs were ended here.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    ended = 0
    where = f"attributes.run_name = '{run_name}'"
    if parent_run_id:
        where += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    for run in client.search_runs([found.experiment_id], filter_string=where):
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
            ended += 1
    return ended


def run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(resolve_tracking_uri(tracking_uri)).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def child_runs(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """``{run name: run id}`` of the runs nested under ``parent_run_id`` (in its experiment)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000)
    return {r.info.run_name: r.info.run_id for r in runs}


def metric_history(tracking_uri: str, run_id: str, metric: str) -> list[dict[str, float]]:
    """Every value of ``metric`` a run logged, as ``[{"step": s, metric: v}, ...]`` in step order."""
    from mlflow.tracking import MlflowClient

    points = MlflowClient(resolve_tracking_uri(tracking_uri)).get_metric_history(run_id, metric)
    return [{"step": m.step, metric: m.value} for m in sorted(points, key=lambda m: (m.step, m.timestamp))]


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))

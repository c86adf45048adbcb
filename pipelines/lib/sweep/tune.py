"""The sweep on Ray Tune: trials, ASHA, reports to Tune, MLflow runs of stopped trials, results.

Each trial is a driver function that runs pre-training (``pretrain.job.run`` on ``RayTrain``: its own
TorchTrainer, Train V2 + ``TuneReportCallback``). In cache mode every trial reads the same
teacher cache, so the teacher is paid for once per sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.lib.pretrain.config import PretrainConfig, reported_metrics
from pipelines.lib.pretrain.job import run as run_pretrain
from pipelines.lib.pretrain.targets import TARGET_SOURCES, check_fits
from pipelines.lib.sweep.folder import check_restorable, claim_new_sweep
from pipelines.lib.sweep.report import trial_status
from pipelines.lib.sweep.search_space import ParamSpec, SearchSpace, trial_run_name
from pipelines.lib.train.backends import RayTrain
from uta_core import tracking
from uta_core.config import apply_overrides, from_dict, to_dict
from uta_core.data.storage import join
from uta_core.targets.source import TargetSource

log = logging.getLogger("uta.sweep")
TRIAL_DRIVER_CPU = 0.01  # a trial's own function: it only drives its TorchTrainer (Tune refuses an empty request)


class EvalReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that carry the sweep metric (the evaluation steps),
    so ASHA compares trials on evaluations and Tune's strict metric check holds. Each carries
    ``total_steps``, so a trial the scheduler stops can be told from one that finished."""

    def __init__(self, metric: str, total_steps: int):
        super().__init__()
        self._metric = metric
        self._total_steps = total_steps

    def after_report(self, run_context, metrics, checkpoint):
        if self._metric in metrics[0]:
            metrics = [{**metrics[0], "total_steps": self._total_steps}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)


class CloseTrialRuns(tune.Callback):
    """On the sweep's driver: record how each trial ended on its MLflow run.

    Tune stops a trial (ASHA) by ending its actor, so the trial cannot end its own MLflow run;
    without this it would show as RUNNING forever. Every trial's run gets the tag
    ``uta.trial_status`` (DONE, STOPPED, ERROR: as in results.csv); a stopped trial's run still
    running is ended KILLED, a failed one FAILED. The stop is asynchronous: a trial that reaches
    its last step before its actor ends finishes its run itself (FINISHED, tagged STOPPED)."""

    def __init__(self, space: SearchSpace, sweep: dict[str, Any]):
        self._space, self._sweep = space, sweep

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = trial_status(False, last.get("step"), last.get("total_steps"))
        self._record(trial, status, "KILLED" if status == "STOPPED" else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR", "FAILED")

    def _record(self, trial, status: str, end_running_as: str) -> None:
        params = {k: trial.config.get(k) for k in self._space.params}
        run_name = trial_run_name(params, trial.trial_id, self._space.unique_labels)
        sweep = self._sweep
        try:
            ended = tracking.end_killed_runs(sweep["tracking_uri"], sweep["experiment"], run_name, end_running_as,
                                             {"uta.trial_status": status}, parent_run_id=sweep["parent_run_id"])
        except Exception as err:  # bookkeeping must never end a sweep
            log.warning("could not update the MLflow run of trial %s: %s", trial.trial_id, err)
        else:
            if ended:
                log.info("trial %s (%s): its MLflow run ended as %s", trial.trial_id, status, end_running_as)


def tune_distribution(spec: ParamSpec) -> Any:
    lo, hi = (spec.values + (None, None))[:2]
    return {
        "grid": lambda: tune.grid_search(list(spec.values)),
        "choice": lambda: tune.choice(list(spec.values)),
        "uniform": lambda: tune.uniform(lo, hi),
        "loguniform": lambda: tune.loguniform(lo, hi),
        "randint": lambda: tune.randint(int(lo), int(hi)),
    }[spec.kind]()


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep: dict[str, Any]) -> PretrainConfig:
    """The pre-training config of one trial: base + this trial's parameters + its run identity: its run folder
    ``<sweep>-<trial id>`` under the sweep's trials, its MLflow run named by its parameters."""
    overrides = [f"{k}={_yaml(v)}" for k, v in params.items()]
    cfg = from_dict(PretrainConfig, apply_overrides(base, overrides))
    trial_id = tune.get_context().get_trial_id()
    run = dataclasses.replace(cfg.run, name=f"{sweep['name']}-{trial_id}", storage_path=sweep["trials_path"])
    # Children live in the parent's experiment: MLflow nests runs within one experiment only.
    trk = dataclasses.replace(cfg.tracking, parent_run_id=sweep["parent_run_id"], experiment=sweep["experiment"],
                              run_name=trial_run_name(params, trial_id, sweep["unique_labels"]))
    return dataclasses.replace(cfg, run=run, tracking=trk)


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's trainable: this trial's pre-training run, reporting its evaluations to Tune."""
    cfg = trial_config(base, params, sweep)
    run_pretrain(cfg, RayTrain(callbacks=lambda plan: [EvalReportCallback(sweep["metric"], plan.total_steps)]))


def check_trials_fit(space: SearchSpace, base: dict[str, Any]) -> None:
    """Every grid point's student must fit its teacher's tokens (a cache's grid / dim / views, an
    online teacher's geometry): refuse before any trial."""
    space.validate_against(PretrainConfig, base)
    sources: dict[str, TargetSource] = {}  # one per teacher (a grid of 20 points shares one manifest read)
    for overrides in space.example_overrides():
        cfg = from_dict(PretrainConfig, apply_overrides(base, overrides))
        check_metric(space, cfg)
        key = json.dumps([to_dict(cfg.data), to_dict(cfg.teacher), cfg.teacher_random_seed, to_dict(cfg.s3)])
        try:
            if key not in sources:
                sources[key] = TARGET_SOURCES[cfg.data.teacher_mode](cfg)
            check_fits(sources[key], cfg)
        except ValueError as err:
            raise ValueError(f"trial {' '.join(overrides)} does not fit its teacher: {err}") from None


def check_metric(space: SearchSpace, cfg: PretrainConfig) -> None:
    """The space's ``metric`` is one the trials report: a misspelt one would give a sweep of ``None``."""
    reported = reported_metrics(cfg)
    if space.metric in reported:
        return
    hint = ""
    if space.metric.startswith(("zeroshot_", "retrieval_")) and not cfg.eval.enabled:
        hint = " (zero-shot and retrieval metrics need eval.input / eval.retrieval_input: set them in fixed:)"
    raise ValueError(f"metric: {space.metric!r} is not reported by the trials{hint}; they report "
                     f"{', '.join(reported)}")


def trial_cpus(cl) -> float:
    """What one trial holds while it trains: its workers, its read tasks' CPUs, its driver function."""
    return cl.num_workers * cl.cpus_per_worker + cl.data_cpus + TRIAL_DRIVER_CPU


def check_room(cfg: PretrainConfig, local: bool) -> None:
    """A trial whose read tasks cannot get a CPU beside its workers waits forever at 0 rows: on a Ray this sweep
    started, that is an error now; on a cluster, a warning (an autoscaler may add nodes)."""
    cl = cfg.cluster
    need = cl.num_workers * cl.cpus_per_worker + cl.read_cpus + TRIAL_DRIVER_CPU
    have = ray.cluster_resources().get("CPU", 0)
    if need <= have or cl.use_gpu:
        return
    message = (f"one trial needs at least {need:g} CPUs (cluster.num_workers={cl.num_workers} x "
               f"cluster.cpus_per_worker={cl.cpus_per_worker} + cluster.read_cpus={cl.read_cpus} for a read task + "
               f"{TRIAL_DRIVER_CPU} for the trial itself) and this Ray has {have:g}: lower cluster.cpus_per_worker, "
               "or give Ray more CPUs")
    if local:
        raise ValueError(message)
    log.warning("%s; trials wait until the cluster grows", message)


def concurrent_trials(cfg: PretrainConfig, space: SearchSpace, requested: int | None = None) -> int:
    """Trials at once: ``requested`` (the CLI), else the space's ``max_concurrent_trials``, else what
    the cluster holds now, each trial with its workers *and* its own CPUs for its read tasks
    (``cluster.data_cpus``: a trial whose reads get no CPU waits for one forever).

    A GPU sweep on a cluster with fewer GPUs than one trial needs is on GPU nodes that scale
    from zero: sized from what is there it would run one trial at a time forever. It runs
    every trial instead; their placement groups are the autoscaler's demand, and trials it
    cannot place yet wait in Tune's queue (PENDING on the dashboard).
    """
    if requested or space.max_concurrent_trials:
        return requested or space.max_concurrent_trials
    resources = ray.cluster_resources()
    cl = cfg.cluster
    if cl.use_gpu and resources.get("GPU", 0) < cl.num_workers:
        log.info("the cluster has %g GPUs, fewer than one trial's %d: running all %d trials at once and letting the "
                 "autoscaler add GPU nodes (cap it with max_concurrent_trials / --max-concurrent)",
                 resources.get("GPU", 0), cl.num_workers, space.num_trials)
        return space.num_trials
    fits = resources.get("CPU", 0) / trial_cpus(cl)
    if cl.use_gpu:
        fits = min(fits, resources.get("GPU", 0) / cl.num_workers)
    return max(1, math.floor(fits))


def make_tuner(space: SearchSpace, base: dict[str, Any], sweep: dict[str, Any], max_concurrent: int) -> tune.Tuner:
    trainable = tune.with_parameters(run_trial, base=base, sweep=sweep)
    # The trial function only drives Train's controller; the workers reserve their own resources.
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU})
    path = join(sweep["storage_path"], sweep["name"])
    if tune.Tuner.can_restore(path):  # Tune unpickles the folder's state: only a folder our sweep made
        check_restorable(path, sweep["name"], sweep["s3"])
        log.info("resuming sweep %s: finished trials are kept", path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    claim_new_sweep(path, sweep["name"], sweep["s3"], sweep["parent_run_id"])
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor, max_t=space.scheduler.max_t or 10**6,
        )
    callbacks = []
    if sweep["parent_run_id"]:
        callbacks.append(CloseTrialRuns(space, sweep))
    return tune.Tuner(
        trainable,
        param_space={key: tune_distribution(spec) for key, spec in space.params.items()},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                    num_samples=space.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=sweep["name"], storage_path=sweep["storage_path"], callbacks=callbacks),
    )


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

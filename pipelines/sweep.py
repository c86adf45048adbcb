"""Ray Tune sweep over pre-training configs (mask strategy x ratio, lr, ...), ASHA early stopping.

    python pipelines/sweep.py --space tune_spaces/masking.yaml data.cache=s3://bucket/cache
    python pipelines/sweep.py --smoke-test                      # 4 tiny trials on generated digits
    ray job submit --working-dir . -- python pipelines/sweep.py --space tune_spaces/masking.yaml ...

Each trial is a driver function that builds and fits the pre-training ``TorchTrainer``
(Train V2 + ``TuneReportCallback``). In cache mode every trial reads the same teacher
cache and no trial builds a teacher, so the teacher is paid for once per sweep. MLflow
gets one parent run for the sweep and a child run per trial; at the end the results table
(CSV) and a metric-vs-mask-ratio plot go to the parent. Rerunning the same ``--name``
resumes: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines import pretrain
from pipelines.common import init_ray, start_job, user_error
from uta_core import tracking
from uta_core.cache_format import open_cache
from uta_core.config import apply_overrides, from_dict
from uta_core.pretrain_config import PretrainConfig
from uta_core.search_space import ParamSpec, SearchSpace, load_search_space
from uta_core.storage import is_s3, join
from uta_core.sweep_report import plot_metric_vs_ratio, results_table, trial_status

log = logging.getLogger("uta.sweep")
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "uta-sweep"


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

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str):
        self._uri, self._experiment, self._name = tracking_uri, experiment, sweep_name

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = trial_status(False, trial.last_result or {})
        self._record(trial, status, "KILLED" if status == "STOPPED" else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR", "FAILED")

    def _record(self, trial, status: str, end_running_as: str) -> None:
        run_name = trial_run_name(self._name, trial.trial_id)
        try:
            ended = tracking.end_killed_runs(self._uri, self._experiment, run_name, end_running_as,
                                             {"uta.trial_status": status})
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


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """A trial's run name, in Ray Train's storage and in MLflow: how the driver finds its run."""
    return f"{sweep_name}-{trial_id}"


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep: dict[str, Any]) -> PretrainConfig:
    """The pre-training config of one trial: base + this trial's parameters + its run identity."""
    overrides = [f"{k}={_yaml(v)}" for k, v in params.items()]
    cfg = from_dict(PretrainConfig, apply_overrides(base, overrides))
    name = trial_run_name(sweep["name"], tune.get_context().get_trial_id())
    run = dataclasses.replace(cfg.run, name=name, storage_path=sweep["trials_path"])
    # Children live in the parent's experiment: MLflow nests runs within one experiment only.
    trk = dataclasses.replace(cfg.tracking, parent_run_id=sweep["parent_run_id"], experiment=sweep["experiment"],
                              run_name=name)
    return dataclasses.replace(cfg, run=run, tracking=trk)


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's trainable: build this trial's datasets and TorchTrainer, report evaluations to Tune."""
    cfg = pretrain.resolve(trial_config(base, params, sweep))
    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's table is the progress view
    if cfg.data.teacher_mode == "cache":
        ds, rows, mean, std = pretrain.cache_dataset(cfg)
    else:
        (ds, rows), mean, std = pretrain.online_dataset(cfg), None, None
    plan = pretrain.make_plan(cfg, rows, mean, std)
    pretrain.save_resolved_config(cfg, plan)
    pretrain.build_trainer(cfg, ds, plan, callbacks=[EvalReportCallback(sweep["metric"], plan.total_steps)]).fit()


def check_cache_fits(space: SearchSpace, base: dict[str, Any]) -> None:
    """In cache mode, every grid point must fit the cache's grid / dim / views: refuse before any trial."""
    space.validate_against(PretrainConfig, base)
    manifests = {}  # one read per cache (a grid of 20 points shares one, often on S3)
    for overrides in space.example_overrides():
        cfg = from_dict(PretrainConfig, apply_overrides(base, overrides))
        if cfg.data.teacher_mode != "cache":
            continue
        key = (cfg.data.cache, cfg.s3)
        if key not in manifests:
            manifests[key] = open_cache(cfg.data.cache, cfg.s3)[2]
        manifest = manifests[key]
        try:
            pretrain.check_cache(manifest, cfg, cfg.data.cache)
        except ValueError as err:
            raise ValueError(f"trial {' '.join(overrides)} does not fit the cache: {err}") from None


def concurrent_trials(cfg: PretrainConfig, requested: int | None) -> int:
    """As many trials as the cluster holds at once, each with its workers *and* its own Ray Data
    budget (``cluster.data_cpus``): a trial whose data pipeline gets no CPU hangs at 0 rows."""
    if requested:
        return requested
    resources = ray.cluster_resources()
    cl = cfg.cluster
    fits = resources.get("CPU", 0) / (cl.num_workers * cl.cpus_per_worker + cl.data_cpus)
    if cl.use_gpu:
        fits = min(fits, resources.get("GPU", 0) / cl.num_workers)
    return max(1, math.floor(fits))


def make_tuner(space: SearchSpace, base: dict[str, Any], sweep: dict[str, Any], max_concurrent: int) -> tune.Tuner:
    trainable = tune.with_parameters(run_trial, base=base, sweep=sweep)
    # The trial function only drives Train's controller; the workers reserve their own resources.
    # (Tune refuses an empty request, hence a token fraction of a CPU.)
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    path = join(sweep["storage_path"], sweep["name"])
    if tune.Tuner.can_restore(path):
        log.info("resuming sweep %s: finished trials are kept", path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor, max_t=space.scheduler.max_t or 10**6,
        )
    callbacks = []
    if sweep["parent_run_id"]:
        callbacks.append(CloseTrialRuns(base["tracking"]["tracking_uri"], sweep["experiment"], sweep["name"]))
    return tune.Tuner(
        trainable,
        param_space={key: tune_distribution(spec) for key, spec in space.params.items()},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                    num_samples=space.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=sweep["name"], storage_path=sweep["storage_path"], callbacks=callbacks),
    )


def log_results(results: tune.ResultGrid, space: SearchSpace, out_dir: Path) -> Path:
    """Results CSV + metric-vs-ratio plot on the parent run; the best trial's config and checkpoint."""
    import mlflow

    trials = [
        {"trial_id": (r.metrics or {}).get("trial_id", r.path.rsplit("/", 1)[-1]), "status": trial_status(bool(r.error), r.metrics or {}), "config": r.config,
         "last": r.metrics or {}, "history": r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []}
        for r in results
    ]
    table = results_table(trials, list(space.params), space.metric, space.mode)
    csv = out_dir / "results.csv"
    table.to_csv(csv, index=False)
    print(table.to_string(index=False))
    plot = plot_metric_vs_ratio(table, space.metric, out_dir / "metric_vs_mask_ratio.png")
    best = results.get_best_result(metric=space.metric, mode=space.mode, filter_nan_and_inf=True)
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(csv))
        if plot:
            mlflow.log_artifact(str(plot))
        mlflow.log_dict(best.config, "best_trial_config.yaml")
        mlflow.log_metric(f"best_{space.metric}", float(best.metrics.get(space.metric, float("nan"))))
        if best.checkpoint is not None:
            mlflow.set_tag("best_checkpoint", best.checkpoint.path)
    return csv


def smoke_overrides(workdir: Path) -> list[str]:
    """Digits + a tiny random teacher, cached once in ``workdir``: 4 nano trials in minutes on a CPU."""
    from pipelines import cache_teacher, evaluate

    train_overrides = pretrain.smoke_overrides(workdir)
    teacher = [o for o in train_overrides if o.startswith(("teacher.", "teacher_random_seed"))]
    prompts = [o for o in train_overrides if o.startswith(("eval.classnames", "eval.templates"))]
    mlflow_db = f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"
    cache, classifier = workdir / "cache", workdir / "classifier.pt"
    steps = [
        cache_teacher.main([f"input.paths={workdir / 'digits' / 'train'}", f"output.path={cache}", "views.size=32",
                            "num_views=1", mlflow_db, *teacher]),
        evaluate.main(["build-classifier", f"output={classifier}", mlflow_db, *teacher,
                       *(o.removeprefix("eval.") for o in prompts)]),
    ]
    if any(code != 0 for code in steps):
        raise RuntimeError("smoke test: building the teacher cache or the classifier failed")
    drop = ("data.teacher_mode", "data.input", "teacher", "eval.classnames", "eval.templates")
    keep = [o for o in train_overrides if not o.startswith(drop)]
    return keep + ["data.teacher_mode=cache", f"data.cache={cache}", f"eval.classifier_path={classifier}",
                   "cluster.num_workers=1", "eval.every=2", "run.log_every=2", "train.max_steps=4"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--space", type=Path, default=ROOT / "tune_spaces" / "masking.yaml",
                        help="search space YAML (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=pretrain.DEFAULT_CONFIG,
                        help="base pre-training config (default: %(default)s)")
    parser.add_argument("--name", default="uta-sweep", help="sweep name; rerun the same name to resume")
    parser.add_argument("--storage-path", default="runs/sweeps", help="local folder or s3://bucket/prefix")
    parser.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster holds")
    parser.add_argument("--smoke-test", action="store_true", help="tune_spaces/smoke.yaml on generated digits")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, overrides: list[str]) -> Path:
    space = load_search_space(args.space)
    base_text = args.config.read_text() if args.config.is_file() else ""
    base = apply_overrides(yaml.safe_load(base_text) or {}, space.fixed_overrides() + overrides)
    check_cache_fits(space, base)
    base_cfg = pretrain.resolve(from_dict(PretrainConfig, base))
    storage = args.storage_path if is_s3(args.storage_path) else str(Path(args.storage_path).resolve())
    # A new local Ray gets room for two trials at once, each with its workers and its Ray Data CPUs.
    started = init_ray(base_cfg.cluster.address, 2 * pretrain.local_num_cpus(base_cfg))
    try:
        experiment = EXPERIMENT  # the trials' runs are nested under the sweep's run, in its experiment
        parent_cfg = dataclasses.replace(base_cfg.tracking, experiment=experiment)
        with tracking.start_run(parent_cfg, experiment, run_name=args.name) as parent:
            tracking.log_config(space)
            sweep = {"name": args.name, "experiment": experiment, "storage_path": storage, "trials_path": join(storage, f"{args.name}-trials"),
                     "metric": space.metric, "parent_run_id": parent.info.run_id if parent else None}
            base["tracking"] = {**base.get("tracking", {}), "tracking_uri": base_cfg.tracking.tracking_uri}
            tuner = make_tuner(space, base, sweep, concurrent_trials(base_cfg, args.max_concurrent))
            results = tuner.fit()
            out_dir = Path(tempfile.mkdtemp(prefix="uta-sweep-")) if is_s3(storage) else Path(storage) / args.name
            return log_results(results, space, out_dir)
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def smoke_test(workdir: Path) -> list[str]:
        args.space = ROOT / "tune_spaces" / "smoke.yaml"
        args.storage_path = str(workdir / "sweeps")
        return smoke_overrides(workdir)

    try:
        csv = run(args, start_job(args, smoke_test, "sweep"))
    except ValueError as err:
        return user_error(err)
    print(f"results: {csv}")
    return 0


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


if __name__ == "__main__":
    sys.exit(main())

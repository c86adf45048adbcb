"""A sweep as a function: the base config, one MLflow parent run, the Tune run, the results."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path

import ray
from ray import tune

from pipelines.lib.destinations import check_output
from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.ray_setup import init_ray
from pipelines.lib.sweep.folder import check_restorable, sweep_owner
from pipelines.lib.sweep.results import SweepOutcome, log_results
from pipelines.lib.sweep.search_space import load_search_space
from pipelines.lib.sweep.tune import check_room, check_trials_fit, concurrent_trials, make_tuner, trial_cpus
from pipelines.lib.train.config import check_folder_name
from pipelines.lib.train.launch import resolve_paths
from uta_core import tracking
from uta_core.config import apply_overrides, from_dict, read_yaml
from uta_core.data.storage import is_s3, join
from uta_core.lease import Lease

EXPERIMENT = "uta-sweep"
log = logging.getLogger("uta.sweep")


def space_overrides(args: argparse.Namespace) -> list[str]:
    """The command's changes to the space file (``--seeds``)."""
    return [f"seeds={args.seeds}"] if getattr(args, "seeds", None) else []


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> SweepOutcome:
    """Run (or resume) the sweep ``args.name``: ``args.space`` over ``args.config`` + ``overrides``;
    returns where its results are and how many trials failed."""
    check_folder_name("--name", args.name)  # Tune's state, the trials and the results stay in --storage-path
    space = load_search_space(args.space, space_overrides(args))
    base = apply_overrides(read_yaml(args.config), space.fixed_overrides() + overrides)
    base_cfg = resolve_paths(from_dict(PretrainConfig, base))  # where things go first: tracking, outputs
    check_output("--storage-path", args.storage_path)
    storage = args.storage_path if is_s3(args.storage_path) else str(Path(args.storage_path).resolve())
    parent_run_id = None
    if tune.Tuner.can_restore(join(storage, args.name)):  # before Ray starts: nothing of a foreign folder is loaded
        check_restorable(join(storage, args.name), args.name, base_cfg.s3)
        parent_run_id = _recorded_parent(join(storage, args.name), base_cfg)
    check_trials_fit(space, base)  # every grid point, its teacher, the metric
    with Lease(join(storage, args.name), base_cfg.s3, "sweep", base_cfg.run.lease).held():  # one driver a sweep
        return _run_sweep(args, space, base, base_cfg, storage, parent_run_id)


def _recorded_parent(folder: str, cfg: PretrainConfig) -> str | None:
    """The MLflow run a resumed sweep continues: the one its folder records, if this tracking store has it."""
    recorded = (sweep_owner(folder, cfg.s3) or {}).get("parent_run_id")
    if not recorded or not cfg.tracking.enabled:
        return None
    if tracking.run_exists(cfg.tracking.tracking_uri, recorded):
        return recorded
    log.warning("the sweep's MLflow run %s is not in %s: this resumed sweep starts a new parent run", recorded,
                cfg.tracking.tracking_uri)
    return None


def _run_sweep(args: argparse.Namespace, space, base: dict, base_cfg: PretrainConfig, storage: str,
               parent_run_id: str | None) -> SweepOutcome:
    # A new local Ray gets room for two trials at once, each with its workers, its read tasks' CPUs, its driver.
    started = init_ray(base_cfg.cluster.address, math.ceil(2 * trial_cpus(base_cfg.cluster)))
    try:
        check_room(base_cfg, local=started and not (base_cfg.cluster.address or os.environ.get("RAY_ADDRESS")))
        experiment = EXPERIMENT  # the trials' runs are nested under the sweep's run, in its experiment
        parent_cfg = dataclasses.replace(base_cfg.tracking, experiment=experiment)
        with tracking.start_run(parent_cfg, experiment, run_name=args.name, source="pipelines/sweep.py",
                                run_id=parent_run_id) as parent:
            if parent_run_id is None:
                tracking.log_config(space)
            else:
                log.info("resuming sweep %s: its MLflow run %s continues", args.name, parent_run_id)
            sweep = {"name": args.name, "experiment": experiment, "storage_path": storage,
                     "trials_path": join(storage, f"{args.name}-trials"), "metric": space.metric,
                     "parent_run_id": parent.info.run_id if parent else None, "s3": base_cfg.s3,
                     "tracking_uri": base_cfg.tracking.tracking_uri,  # resolved by resolve_paths
                     "unique_labels": space.unique_labels}
            # Trials compare settings: no MLflow model per trial unless asked for (export the best one).
            base["tracking"] = {"log_model": False, **base.get("tracking", {}),
                                "tracking_uri": base_cfg.tracking.tracking_uri}
            tuner = make_tuner(space, base, sweep, concurrent_trials(base_cfg, space, args.max_concurrent))
            results = tuner.fit()
            out_dir = Path(tempfile.mkdtemp(prefix="uta-sweep-")) if is_s3(storage) else Path(storage) / args.name
            outcome = log_results(results, space, out_dir, sweep)
            if parent is not None and outcome.succeeded == 0:
                import mlflow

                mlflow.end_run("FAILED")
        if parent is not None:  # the sweep's run, with a child run per trial
            print(tracking.where_runs_are(base_cfg.tracking.tracking_uri, parent.info.run_id))
        return outcome
    finally:
        if started:
            ray.shutdown()

"""A sweep as a function: the base config, one MLflow parent run, the Tune run, the results."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import ray
from ray import tune

from pipelines.lib.destinations import check_output
from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.ray_setup import init_ray
from pipelines.lib.sweep.folder import check_restorable
from pipelines.lib.sweep.search_space import load_search_space
from pipelines.lib.sweep.tune import check_trials_fit, concurrent_trials, log_results, make_tuner
from pipelines.lib.train.backends import local_num_cpus
from pipelines.lib.train.config import check_folder_name
from pipelines.lib.train.launch import resolve_paths
from uta_core import tracking
from uta_core.config import apply_overrides, from_dict, read_yaml
from uta_core.data.storage import is_s3, join
from uta_core.lease import Lease

EXPERIMENT = "uta-sweep"


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Run (or resume) the sweep ``args.name``: ``args.space`` over ``args.config`` + ``overrides``;
    returns the results CSV."""
    check_folder_name("--name", args.name)  # Tune's state, the trials and the results stay in --storage-path
    space = load_search_space(args.space)
    base = apply_overrides(read_yaml(args.config), space.fixed_overrides() + overrides)
    check_trials_fit(space, base)
    base_cfg = resolve_paths(from_dict(PretrainConfig, base))
    check_output("--storage-path", args.storage_path)
    storage = args.storage_path if is_s3(args.storage_path) else str(Path(args.storage_path).resolve())
    if tune.Tuner.can_restore(join(storage, args.name)):  # before Ray starts: nothing of a foreign folder is loaded
        check_restorable(join(storage, args.name), args.name, base_cfg.s3)
    with Lease(join(storage, args.name), base_cfg.s3, "sweep", base_cfg.run.lease).held():  # one driver a sweep
        return _run_sweep(args, space, base, base_cfg, storage)


def _run_sweep(args: argparse.Namespace, space, base: dict, base_cfg: PretrainConfig, storage: str) -> Path:
    # A new local Ray gets room for two trials at once, each with its workers and its read tasks' CPUs.
    started = init_ray(base_cfg.cluster.address, 2 * local_num_cpus(base_cfg.cluster))
    try:
        experiment = EXPERIMENT  # the trials' runs are nested under the sweep's run, in its experiment
        parent_cfg = dataclasses.replace(base_cfg.tracking, experiment=experiment)
        with tracking.start_run(parent_cfg, experiment, run_name=args.name, source="pipelines/sweep.py") as parent:
            tracking.log_config(space)
            sweep = {"name": args.name, "experiment": experiment, "storage_path": storage,
                     "trials_path": join(storage, f"{args.name}-trials"), "metric": space.metric,
                     "parent_run_id": parent.info.run_id if parent else None, "s3": base_cfg.s3}
            # Trials compare settings: no MLflow model per trial unless asked for (export the best one).
            base["tracking"] = {"log_model": False, **base.get("tracking", {}),
                                "tracking_uri": base_cfg.tracking.tracking_uri}
            tuner = make_tuner(space, base, sweep, concurrent_trials(base_cfg, space, args.max_concurrent))
            results = tuner.fit()
            out_dir = Path(tempfile.mkdtemp(prefix="uta-sweep-")) if is_s3(storage) else Path(storage) / args.name
            csv = log_results(results, space, out_dir)
        if parent is not None:  # the sweep's run, with a child run per trial
            print(tracking.where_runs_are(base_cfg.tracking.tracking_uri, parent.info.run_id))
        return csv
    finally:
        if started:
            ray.shutdown()

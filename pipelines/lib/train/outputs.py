"""A run's outputs, written by rank 0: the MLflow run, the export, the loss curve.

Every method is a no-op on other ranks. A run's MLflow run is opened by rank 0 and its id is
kept in the checkpoint, so a resumed run (a restarted worker group, a resubmitted driver)
continues the same MLflow run. Every write goes through the run folder, which checks the lease.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from pipelines.lib.train.plan import RunPlan
from pipelines.lib.train.spec import Task, TrainJob
from uta_core import tracking
from uta_core.checkpoint import Position
from uta_core.config import flatten, to_dict
from uta_core.datasets import EVALUATION, TRAINING, digest_of, log_dataset
from uta_core.lease import LeaseLost
from uta_core.models.export import UTA_CONFIG
from uta_core.models.mlflow_model import log_student_model
from uta_core.models.open_clip_export import link_open_clip
from uta_core.run.folder import RunFolder


class RunOutputs:
    def __init__(self, job: TrainJob, plan: RunPlan, task: Task, rank: int, run: RunFolder) -> None:
        self.job, self.cfg, self.plan, self.task, self.folder = job, job.cfg, plan, task, run
        self.active = rank == 0
        self.run_id: str | None = None
        self._run = None
        self._stack = contextlib.ExitStack()

    def open(self, pos: Position) -> None:
        """Start the MLflow run, or reopen the checkpoint's run when resuming."""
        if not (self.active and self.cfg.tracking.enabled):
            return
        import mlflow

        if pos.mlflow_run_id:
            mlflow.set_tracking_uri(tracking.resolve_tracking_uri(self.cfg.tracking.tracking_uri))
            self._run = self._stack.enter_context(
                mlflow.start_run(run_id=pos.mlflow_run_id, log_system_metrics=self.cfg.tracking.system_metrics))
            mlflow.set_tag("uta.resumed_from_step", str(pos.step))
        else:
            tags = {"job": self.job.name, "uta.run_name": self.cfg.run.name, **self.job.run_tags()}
            run_name = self.cfg.tracking.run_name or self.cfg.run.name
            self._run = self._stack.enter_context(
                tracking.start_run(self.cfg.tracking, self.job.experiment, run_name=run_name, tags=tags,
                                   source=f"pipelines/{self.job.name}.py",
                                   system_metrics=self.cfg.tracking.system_metrics))
            tracking.log_config(self.cfg)
            params = {**flatten(self.plan.summary(), "plan"), **flatten(self.job.run_params())}
            mlflow.log_params(tracking.redact_params(params))
            mlflow.log_dict(to_dict(self.cfg), "config.yaml")
            self._log_datasets()
            self.task.on_run_start(mlflow.log_artifact)
        self.run_id = self._run.info.run_id
        self.folder.save_mlflow_record(self.run_id, mlflow.get_tracking_uri())  # the driver ends it if we die

    def _log_datasets(self) -> None:
        """The run's data as MLflow datasets: what it trains on (digest: the listed sources and their rows)
        and what it evaluates on."""
        name, uris = self.job.training_data()
        sources = self.plan.sources
        log_dataset(name, uris, digest_of([str(item) for item in sources.items], sources.rows), TRAINING,
                    sources=len(sources.items), rows_per_epoch=sources.total_rows, counted_from=sources.counted_from)
        for key in ("input", "retrieval_input"):
            given = getattr(getattr(self.cfg, "eval", None), key, None)
            if given is not None:
                log_dataset(f"eval.{key}", list(given.paths), digest_of(list(given.paths)), EVALUATION)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self._run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, error: BaseException | None = None) -> None:
        """End the MLflow run: FINISHED, or FAILED when ``error`` stopped training. A job that lost the run
        folder leaves it as it is (the new owner continues it)."""
        if isinstance(error, LeaseLost) and self._run is not None:
            self._stack.pop_all()
            tracking.leave_run()
        elif error is not None:
            self._stack.__exit__(type(error), error, None)
        else:
            self._stack.close()
        self._run = None

    def finish(self, step: int) -> None:
        """The export (to ``<run>/export`` and to MLflow) and the loss curve."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="uta-export-") as folder:
            self.task.export(Path(folder), step)
            if self.cfg.run.export:
                local = self.folder.write_export(folder)
                if local is not None:  # its open_clip config names the folder it sits in
                    link_open_clip(local)
            if self._run is not None:
                self.folder.guard("the MLflow artefacts")
                import mlflow

                mlflow.log_artifacts(folder, self.job.artifact_name)
                self._log_loss_curve(folder)
                if self.cfg.tracking.log_model and (Path(folder) / UTA_CONFIG).is_file():
                    log_student_model(folder, register_as=self.cfg.tracking.register_as)

    def _log_loss_curve(self, folder: str) -> None:
        import mlflow
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        history = mlflow.tracking.MlflowClient().get_metric_history(self.run_id, "loss")
        if not history:
            return
        points = sorted((m.step, m.value) for m in history)
        fig = Figure(figsize=(5, 3.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(xlabel="optimiser step", ylabel="loss", title=f"{self.cfg.run.name}: {self.task.describe()}")
        path = Path(folder) / "loss_curve.png"
        fig.savefig(path, dpi=110)
        mlflow.log_artifact(str(path))

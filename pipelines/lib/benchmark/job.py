"""The paper's benchmark table for one model: clip_benchmark's zero-shot classification and retrieval
on a list of datasets, one row each, as ``table.csv`` + ``table.md``, logged to MLflow.

``model`` is an open_clip export folder (``pipelines/export.py``), or anything the export takes (a
released UTA checkpoint file, a run, a checkpoint; local or ``s3://``), exported first into
``<output>/model``. Each dataset runs in its own ``clip_benchmark eval`` process
(``pipelines.lib.benchmark.clip_benchmark``); its JSON goes to ``<output>/results/``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.lib.benchmark.clip_benchmark import command, run_one, task_of, write_table
from pipelines.lib.destinations import check_tracking
from pipelines.lib.export.job import ExportConfig
from pipelines.lib.export.job import run as export
from uta_core import tracking
from uta_core.config import SettingError
from uta_core.data.storage import S3Options
from uta_core.models.open_clip_export import OPEN_CLIP_CONFIG
from uta_core.models.teacher import TeacherConfig
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.benchmark")


@dataclass(kw_only=True)
class BenchmarkConfig:
    model: str | None = None  # an export folder, or a released UTA file / run / checkpoint (exported first)
    datasets: list[str] = field(default_factory=list)  # clip_benchmark names: imagenet1k, cifar10, mscoco_captions, ...
    dataset_root: str = "root"  # clip_benchmark's --dataset_root; {dataset} is each dataset's name (wds/ removed)
    output: str = "outputs/benchmark"  # results/<dataset>.json, table.csv, table.md (model/ when exported)
    batch_size: int = 64
    num_workers: int = 4
    amp: bool = True  # mixed precision (on a GPU)
    clip_benchmark: str | None = None  # a clip_benchmark executable of another environment; null: this one's
    teacher: TeacherConfig | None = None  # exporting a run that records no teacher: the text tower
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if not self.model:
            raise SettingError("model", "benchmark needs {key}=<export folder or released checkpoint>")
        if not self.datasets:
            raise SettingError("datasets", "benchmark needs {key}=[...] (clip_benchmark names, e.g. "
                                           "[imagenet1k,cifar10,mscoco_captions,flickr30k])")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")


def model_folder(cfg: BenchmarkConfig, out: Path) -> Path:
    """The open_clip folder to benchmark: ``model`` itself, or its export into ``<output>/model``."""
    given = Path(cfg.model)
    if (given / OPEN_CLIP_CONFIG).is_file():
        return given
    log.info("exporting %s to %s (an open_clip folder)", cfg.model, out / "model")
    export(ExportConfig(model=cfg.model, output=str(out / "model"), teacher=cfg.teacher, s3=cfg.s3))
    return out / "model"


def run(cfg: BenchmarkConfig) -> dict:
    out = Path(cfg.output).expanduser()
    if (out / "table.csv").exists():
        raise ValueError(f"output={out} already holds a table; choose a new folder")
    check_tracking(cfg.tracking)
    (out / "results").mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(cfg, out)
    cmd = command(cfg.clip_benchmark)
    options = ["--batch_size", str(cfg.batch_size), "--num_workers", str(cfg.num_workers)]
    options += [] if cfg.amp else ["--no_amp"]
    rows = []
    for i, dataset in enumerate(cfg.datasets, 1):
        name = dataset.removeprefix("wds/")
        root = cfg.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
        task = task_of(dataset, root)
        log.info("%d/%d %s: %s", i, len(cfg.datasets), dataset, task)
        metrics = run_one(cmd, model_dir, dataset, root, task, out / "results" / f"{name.replace('/', '_')}.json",
                          options)
        rows.append({"dataset": dataset, "task": task, **{k: v for k, v in metrics.items() if _number(v)}})
    csv_path, md_path = write_table(rows, out)
    with tracking.start_run(cfg.tracking, "uta-benchmark", tags={"job": "benchmark", "uta.model": cfg.model},
                            source="pipelines/benchmark.py") as mlrun:
        tracking.log_config(cfg)
        tracking.log_metrics({f"{r['dataset']}/{k}".replace("@", "_at"): v for r in rows for k, v in r.items()
                              if k not in ("dataset", "task")})  # MLflow refuses '@' in a name
        tracking.log_artifacts([csv_path, md_path, *sorted((out / "results").glob("*.json"))])
        run_id = mlrun.info.run_id if mlrun is not None else None
    print(md_path.read_text(), end="", file=sys.stderr)  # stdout stays the JSON result
    return {"model": str(model_dir), "table": str(csv_path), "markdown": str(md_path), "rows": rows,
            "mlflow_run_id": run_id, "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

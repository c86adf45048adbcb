"""The end-to-end demo: a student that classifies zero-shot without ever seeing a caption.

    ./uta demo                        # the README's main command (python pipelines/demo.py)
    ./uta demo student.train.max_steps=800 out=outputs/demo2

On real images (scikit-learn's digits, shipped with the package), in one local Ray:
1. write train / held-out WebDataset shards with captions ("a photo of the digit seven");
2. train a small CLIP teacher on the train split with its captions (pipelines/contrastive.py);
3. cache the teacher's projected tokens for the train images (pipelines/cache_teacher.py);
4. pre-train a UTA student from the cache: train images only, no captions (pipelines/pretrain.py);
5. zero-shot and retrieval on the held-out split with the teacher's text tower: the teacher,
   the UTA student's export and an untrained student of the same architecture;
6. print the table, the MLflow runs and the command that opens the MLflow UI.

The sections ``teacher``, ``cache`` and ``student`` of configs/demo.yaml are overrides of
each pipeline's own default config; the demo sets the paths that connect the stages.
Every invocation writes a fresh ``<out>/runs/<timestamp>/``; MLflow (``<out>/mlflow.db``)
keeps the runs of all invocations.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch

from pipelines.lib.cache import job as cache_job
from pipelines.lib.cache.config import CacheConfig
from pipelines.lib.cli import setup_logging, user_error
from pipelines.lib.contrastive import job as contrastive_job
from pipelines.lib.contrastive.config import ContrastiveJobConfig
from pipelines.lib.demo.config import (
    DEFAULT_CONFIG,
    DemoConfig,
    Paths,
    load_demo_config,
    stage_config,
)
from pipelines.lib.demo.report import mlflow_history, plot_curves, print_table, retrieval_rows
from pipelines.lib.destinations import check_output, check_tracking
from pipelines.lib.evaluate import job as evaluate_job
from pipelines.lib.pretrain import job as pretrain_job
from pipelines.lib.pretrain.config import PretrainConfig
from pipelines.lib.ray_setup import cluster_resources, init_ray
from pipelines.lib.train.launch import run_folder
from uta_core import tracking
from uta_core.config import printable_config, to_dict
from uta_core.data.digits import CLASS_NAMES, TEMPLATES, write_digits_splits
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.eval.data import load_caption_set, load_eval_set
from uta_core.eval.evaluator import load_classifier, retrieval_metrics, zeroshot_accuracy
from uta_core.models.student import UTAStudent
from uta_core.models.teacher import Teacher, TeacherConfig
from uta_core.models.trained import load_trained_student
from uta_core.tracking import TrackingConfig

log = logging.getLogger("uta.demo")


# --------------------------------------------------------------------- stages
def _tracking(cfg: DemoConfig, paths: Paths, run_name: str) -> dict[str, Any]:
    return {"tracking_uri": paths.tracking_uri, "experiment": cfg.experiment, "run_name": run_name}


def teacher_config(cfg: DemoConfig, paths: Paths, worker_cpus: int) -> ContrastiveJobConfig:
    wiring = {
        "cluster": {"num_workers": 1, "cpus_per_worker": worker_cpus},
        "data": {"input": {"paths": [str(paths.digits / "train")]}, "views": {"size": cfg.digits.size}},
        "model": {"clip": {"vision": {"image_size": cfg.digits.size}}},
        "eval": {"input": {"paths": [str(paths.digits / "heldout")]},
                 "classnames": list(CLASS_NAMES), "templates": list(TEMPLATES)},
        "run": {"name": "demo-teacher", "storage_path": str(paths.work)},
        "tracking": _tracking(cfg, paths, "demo-teacher"),
    }
    return stage_config(ContrastiveJobConfig, "teacher", wiring, cfg.teacher)


def teacher_files(tcfg: ContrastiveJobConfig, paths: Paths) -> tuple[str, str]:
    model_dir = Path(run_folder(tcfg).export_uri)  # where the teacher's run exports it
    name = tcfg.model.clip.name
    return str(model_dir / f"{name}.json"), str(model_dir / f"{name}.pt")


def cache_config(cfg: DemoConfig, paths: Paths, arch: str, weights: str) -> CacheConfig:
    wiring = {
        "input": {"paths": [str(paths.digits / "train")]},
        "output": {"path": str(paths.cache)},
        "teacher": {"arch": arch, "pretrained": weights, "precision": "fp32"},
        "views": {"size": cfg.digits.size},
        "tracking": _tracking(cfg, paths, "demo-cache"),
    }
    return stage_config(CacheConfig, "cache", wiring, cfg.cache)


def student_mode(cfg: DemoConfig) -> str:
    """The student's teacher mode: cache (the default), or stream / online (no cache: fresh views)."""
    return (cfg.student.get("data") or {}).get("teacher_mode", "cache")


def student_config(cfg: DemoConfig, paths: Paths, worker_cpus: int, arch: str, weights: str) -> PretrainConfig:
    if student_mode(cfg) == "cache":
        data: dict[str, Any] = {"teacher_mode": "cache", "cache": str(paths.cache), "input": None}
        teacher: dict[str, Any] = {}
    else:  # the teacher's views as the cache stage draws them, fresh every epoch
        views = {**(cfg.cache.get("views") or {}), "size": cfg.digits.size}
        data = {"cache": None, "input": {"paths": [str(paths.digits / "train")]}, "views": views}
        teacher = {"teacher": {"arch": arch, "pretrained": weights, "precision": "fp32"}}
    wiring = {
        "cluster": {"num_workers": 1, "cpus_per_worker": worker_cpus},
        "data": data, **teacher,
        "student": {"img_size": cfg.digits.size},
        "run": {"name": paths.student_run, "storage_path": str(paths.work)},
        "eval": {"input": {"paths": [str(paths.digits / "heldout")]}, "classifier_path": str(paths.classifier),
                 "retrieval_input": {"paths": [str(paths.digits / "heldout")]}},
        "tracking": _tracking(cfg, paths, "demo-student"),
    }
    return stage_config(PretrainConfig, "student", wiring, cfg.student)


def write_classifier(cfg: DemoConfig, paths: Paths, arch: str, weights: str) -> None:
    ecfg = evaluate_job.EvaluateConfig(
        teacher=TeacherConfig(arch=arch, pretrained=weights, precision="fp32"),
        classnames=list(CLASS_NAMES), templates=list(TEMPLATES), output=str(paths.classifier), device="cpu",
        retrieval_input=InputConfig(paths=[str(paths.digits / "heldout")]),
    )
    evaluate_job.build_classifier_file(ecfg)


def evaluate_all(cfg: DemoConfig, paths: Paths, arch: str, weights: str, scfg: PretrainConfig) -> dict[str, Any]:
    """Zero-shot top-1 and image <-> text recall on the held-out split: teacher, UTA student (its export, as
    users load it), untrained control. In this process: 359 digits of 16 px encode in well under a second
    a model, less than an encoder actor takes to start (pipelines/evaluate.py streams large sets)."""
    heldout = InputConfig(paths=[str(paths.digits / "heldout")])
    teacher = Teacher.from_open_clip(arch, weights)
    classifier = load_classifier(str(paths.classifier))
    pixels, labels = load_eval_set(heldout, S3Options(), teacher.image_size, 100_000)
    cap_pixels, captions = load_caption_set(heldout, S3Options(), teacher.image_size, 100_000)
    student, student_mean, student_std, _ = load_trained_student(str(paths.student_export), S3Options())
    torch.manual_seed(cfg.control_seed)
    encoders = {"teacher": (teacher.encode_image, teacher.mean, teacher.std),
                "student": (student.eval(), student_mean, student_std),
                "control": (UTAStudent(scfg.student).eval(), teacher.mean, teacher.std)}
    results: dict[str, Any] = {"images": int(labels.numel()), "classes": len(CLASS_NAMES), "retrieval": {},
                               "caption_texts": len(set(captions))}
    for name, (encode, mean, std) in encoders.items():
        results[name] = zeroshot_accuracy(encode, pixels, labels, classifier["weights"], mean, std)["zeroshot_top1"]
        results["retrieval"][name] = retrieval_metrics(encode, cap_pixels, captions, classifier["captions"],
                                                       mean, std)
    return results


# --------------------------------------------------------------------- the run
class StageFailed(RuntimeError):
    pass


def timed(name: str, label: str, times: dict[str, float], fn: Callable[[], Any]) -> Any:
    print(f"\n[demo] {label}", flush=True)
    start = time.perf_counter()
    try:
        return fn()
    except Exception as err:  # every stage failure ends the demo with one clear line
        log.debug("stage %s failed", name, exc_info=True)
        raise StageFailed(f"stage '{name}' ({label}) failed: {type(err).__name__}: {err}") from err
    finally:
        times[name] = time.perf_counter() - start


def run(cfg: DemoConfig) -> dict[str, Any]:
    check_output("out", cfg.out)
    out = Path(cfg.out).expanduser().resolve()
    work = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    paths = Paths(work=work, tracking_uri=cfg.tracking_uri or f"sqlite:///{out / 'mlflow.db'}")
    check_tracking(TrackingConfig(tracking_uri=paths.tracking_uri))
    times: dict[str, float] = {}
    start = time.perf_counter()
    started = init_ray(None, cfg.ray_cpus)
    try:
        # Training workers get every CPU but one, which the read tasks (and the cache job's Ray Data) keep,
        # and but the streamed teacher's actors.
        worker_cpus = max(1, int(cluster_resources()[0]) - 1)
        tcfg = teacher_config(cfg, paths, worker_cpus)  # wiring errors surface before anything runs
        arch, weights = teacher_files(tcfg, paths)
        scfg = student_config(cfg, paths, worker_cpus, arch, weights)
        if scfg.data.teacher_mode == "stream":
            pool = scfg.stream.pool
            scfg = student_config(cfg, paths, max(1, worker_cpus - math.ceil(pool.actors * pool.cpus_per_actor)),
                                  arch, weights)
        paths.student_run = scfg.run.name
        work.mkdir(parents=True, exist_ok=False)
        timed("digits", "1/6 writing digits as WebDataset shards (train / held-out, with captions)", times,
              lambda: write_digits_splits(paths.digits, size=cfg.digits.size,
                                          heldout_fraction=cfg.digits.heldout_fraction,
                                          samples_per_shard=cfg.digits.samples_per_shard,
                                          seed=cfg.digits.seed, limit=cfg.digits.limit))
        teacher_report = timed("teacher", "2/6 training a small CLIP teacher on images + captions", times,
                               lambda: contrastive_job.run(tcfg))

        mode = scfg.data.teacher_mode

        def cache_stage():
            write_classifier(cfg, paths, arch, weights)
            if mode != "cache":
                return
            report = cache_job.run(cache_config(cfg, paths, arch, weights))
            if report["incomplete"]:
                raise RuntimeError(f"the cache left shards incomplete: {', '.join(report['incomplete'])}")

        timed("cache", "3/6 caching the teacher's projected tokens of the train images" if mode == "cache" else
              f"3/6 the teacher's zero-shot classifier ({mode} mode: no cache)", times, cache_stage)
        source = {"cache": "the cache", "stream": "the teacher's actor", "online": "the teacher in the worker"}[mode]
        student_result = timed("student", f"4/6 pre-training the UTA student from {source} (no captions)", times,
                               lambda: pretrain_job.run(scfg))
        results = timed("eval", "5/6 zero-shot on the held-out split: teacher, UTA student, untrained control",
                        times, lambda: evaluate_all(cfg, paths, arch, weights, scfg))
    finally:
        if started:
            ray.shutdown()
    times["total"] = time.perf_counter() - start
    results["ratio"] = results["student"] / max(results["teacher"], 1e-9)
    student_run_id = student_result["mlflow_run_id"]
    print("\n[demo] 6/6 results", flush=True)
    return finish(cfg, paths, teacher_report, student_run_id, results, times, arch, weights)


def finish(cfg, paths, teacher_report, student_run_id, results, times, arch, weights) -> dict[str, Any]:
    """Step 6: curves, results JSON, the demo's own MLflow run, the table."""
    curves = paths.work / "loss_curves.png"
    plot_curves(curves, mlflow_history(paths.tracking_uri, teacher_report["mlflow_run_id"], "loss"),
                mlflow_history(paths.tracking_uri, student_run_id, "loss"),
                mlflow_history(paths.tracking_uri, student_run_id, "zeroshot_top1"), results)
    files = {"teacher": arch, "teacher weights": weights, "student export": str(paths.student_export),
             "cache": str(paths.cache) if student_mode(cfg) == "cache" else "-", "loss curves": str(curves),
             "results": str(paths.work / "results.json")}
    summary = {
        "zeroshot_top1": {k: results[k] for k in ("teacher", "student", "control")},
        "retrieval": results["retrieval"],
        "student_over_teacher": results["ratio"], "heldout_images": results["images"], "seconds": times,
        "files": files, "config": to_dict(cfg),
        "mlflow": {"tracking_uri": paths.tracking_uri, "experiment": cfg.experiment,
                   "teacher_run_id": teacher_report["mlflow_run_id"],
                   "student_run_id": student_run_id},
    }
    with tracking.start_run(TrackingConfig(**_tracking(cfg, paths, "demo")), cfg.experiment,
                            tags={"job": "demo"}, source="pipelines/demo.py") as mlrun:
        summary["mlflow"]["demo_run_id"] = mlrun.info.run_id if mlrun is not None else None
        (paths.work / "results.json").write_text(json.dumps(summary, indent=2))
        tracking.log_config(cfg)
        tracking.log_metrics({f"zeroshot_top1_{k}": v for k, v in summary["zeroshot_top1"].items()}
                             | {f"{metric}_{model}": v for model, row in results["retrieval"].items()
                                for metric, v in row.items()}
                             | {"student_over_teacher": results["ratio"]}
                             | {f"seconds_{k}": v for k, v in times.items()})
        tracking.log_table(retrieval_rows(results["retrieval"]), "retrieval.json")
        if mlrun is not None:
            import mlflow

            mlflow.log_artifact(str(curves))
            mlflow.log_artifact(str(paths.work / "results.json"))
    print_table(results, times, paths, cfg, files)
    return summary


# --------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n", 1)[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the demo's own keys; each stage's wiring) as YAML and exit")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides, e.g. student.train.max_steps=800 out=outputs/demo2")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        if args.print_config:
            print(printable_config(DemoConfig, args.config, list(args.overrides)), end="")
            return 0
        cfg = load_demo_config(args.config, list(args.overrides))
        run(cfg)
    except ValueError as err:  # a config or wiring mistake, before anything ran
        return user_error(err)
    except StageFailed as err:
        traceback.print_exception(err.__cause__)
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

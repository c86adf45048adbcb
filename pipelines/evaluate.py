"""Zero-shot evaluation of a trained student, and the classifier file training uses.

    python pipelines/evaluate.py build-classifier teacher.arch=ViT-B-16 \\
        teacher.pretrained=laion2b_s34b_b88k prompts=imagenet output=outputs/imagenet_classifier.pt
    python pipelines/evaluate.py zeroshot model=runs/uta-local/export \\
        input.paths='data/val/*.tar' classifier_path=outputs/imagenet_classifier.pt

``model`` is a student export folder (``export/`` of a run), a Ray Train checkpoint
folder of ``pipelines/pretrain.py`` (``checkpoint_*``, holding ``state.pt``), or a run
folder (its ``export/``); local or ``s3://``. The classifier is the teacher's text tower
applied once to class names x templates (``build-classifier``), so a cache-mode run never
builds a teacher; ``zeroshot`` can also build it on the fly from ``teacher`` + prompts.
Results (top-1 / top-5) are printed as JSON and logged to MLflow.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipelines.common import setup_logging, user_error
from uta_core import tracking
from uta_core.config import from_dict, load_config
from uta_core.export import UTA_CONFIG, load_student
from uta_core.shards import InputConfig
from uta_core.storage import S3Options, filesystem_for, join, list_dir, read_bytes
from uta_core.student import StudentConfig, UTAStudent
from uta_core.student_eval import (
    load_classifier,
    prompts,
    save_classifier,
    teacher_classifier,
    zeroshot_accuracy,
)
from uta_core.teacher import Teacher, TeacherConfig
from uta_core.tracking import TrackingConfig
from uta_core.train_data import load_eval_set

log = logging.getLogger("uta.evaluate")
COMMANDS = ("build-classifier", "zeroshot")


@dataclass(kw_only=True)
class EvaluateConfig:
    model: str | None = None  # export folder, checkpoint folder or run folder (local or s3://)
    input: InputConfig | None = None  # labelled eval shards
    classifier_path: str | None = None  # zeroshot: read; build-classifier: see `output`
    output: str | None = None  # build-classifier: where the classifier file goes
    teacher: TeacherConfig | None = None  # to build a classifier (its text tower)
    teacher_random_seed: int | None = None  # int: allow random-init teacher weights (tests)
    prompts: str | None = None  # built-in prompt set, e.g. imagenet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_images: int = 10000
    batch_size: int = 64
    device: str = "auto"  # auto: cuda when available
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.batch_size < 1:
            raise ValueError("max_images and batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be auto, cpu or cuda")


# --------------------------------------------------------------------- classifier
def build_teacher(cfg: EvaluateConfig, device: str) -> Teacher:
    if cfg.teacher is None:
        raise ValueError("building a classifier needs teacher.arch (+ teacher.pretrained): the text tower")
    if cfg.teacher.pretrained is None and cfg.teacher_random_seed is None and not cfg.teacher.arch.startswith(
        ("hf-hub:", "local-dir:")
    ):
        raise ValueError(
            "teacher.pretrained is null (random weights): set it, or teacher_random_seed=<int> on purpose"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.teacher_random_seed or 0)
        teacher = Teacher.from_config(cfg.teacher, device="cpu", s3_endpoint_url=cfg.s3.endpoint_url)
    return teacher.to(device)


def build_classifier_file(cfg: EvaluateConfig) -> dict:
    """Write ``cfg.output``: the teacher's zero-shot classifier for the configured prompts."""
    if not cfg.output:
        raise ValueError("build-classifier needs output=<path or s3:// URI> for the classifier file")
    names, templates = prompts(cfg.prompts, cfg.classnames, cfg.templates)
    classifier = teacher_classifier(build_teacher(cfg, resolve_device(cfg.device)), names, templates)
    save_classifier(classifier, cfg.output, cfg.s3)
    return {"output": cfg.output, "classes": len(names), "templates": len(templates),
            "dim": int(classifier["weights"].shape[0])}


# --------------------------------------------------------------------- models
def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model(uri: str, s3: S3Options) -> tuple[UTAStudent, tuple, tuple, dict]:
    """A student from an export, a training checkpoint or a run folder -> (student, mean, std, info)."""
    fs, root = filesystem_for(uri, s3)
    names = {info.path.rsplit("/", 1)[-1] for info in list_dir(fs, root, recursive=False, s3=s3)}
    if not names:
        raise ValueError(f"model={uri} does not exist or is empty")
    if "state.pt" in names:  # a Ray Train checkpoint of pipelines/pretrain.py
        state = torch.load(io.BytesIO(read_bytes(fs, join(root, "state.pt"))), map_location="cpu", weights_only=False)
        student = UTAStudent(from_dict(StudentConfig, state["config"]["student"]))
        student.load_state_dict(state["student"])
        plan = state["plan"]
        return student.eval(), tuple(plan["mean"]), tuple(plan["std"]), {"step": state["position"]["step"]}
    if UTA_CONFIG in names:  # an export folder
        with tempfile.TemporaryDirectory(prefix="uta-eval-") as folder:
            for name in names:
                data = read_bytes(fs, join(root, name))
                if data is not None:
                    (Path(folder) / name).write_bytes(data)
            student, meta = load_student(folder)
        return student, tuple(meta["mean"]), tuple(meta["std"]), {"step": meta.get("step")}
    if "export" in names:  # a run folder
        return load_model(join(uri, "export"), s3)
    raise ValueError(
        f"model={uri} is neither a student export ({UTA_CONFIG}), a checkpoint (state.pt) nor a run folder"
    )


def evaluate(cfg: EvaluateConfig) -> dict:
    """Zero-shot top-1/5 of ``cfg.model`` on ``cfg.input``; logged to MLflow."""
    if not cfg.model or cfg.input is None:
        raise ValueError("zeroshot needs model=<export/checkpoint/run folder> and input.paths=<labelled shards>")
    device = resolve_device(cfg.device)
    student, mean, std, info = load_model(cfg.model, cfg.s3)
    student.to(device)
    if cfg.classifier_path:
        weights_DC = load_classifier(cfg.classifier_path, cfg.s3)["weights"]
    else:
        names, templates = prompts(cfg.prompts, cfg.classnames, cfg.templates)
        weights_DC = teacher_classifier(build_teacher(cfg, device), names, templates)["weights"]
    pixels, labels = load_eval_set(cfg.input, cfg.s3, student.cfg.img_size, cfg.max_images)
    metrics = zeroshot_accuracy(student, pixels, labels, weights_DC, mean, std, batch_size=cfg.batch_size,
                                device=device)
    metrics["images"] = int(labels.numel())
    with tracking.start_run(cfg.tracking, "uta-evaluate", tags={"job": "evaluate"}) as run:
        tracking.log_config(cfg)
        tracking.log_metrics(metrics)
        run_id = run.info.run_id if run is not None else None
    return {"model": cfg.model, **info, **metrics, "mlflow_run_id": run_id}


# --------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", type=Path, default=None, help="optional YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model=runs/x/export")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(EvaluateConfig, args.config, args.overrides)
        result = build_classifier_file(cfg) if args.command == "build-classifier" else evaluate(cfg)
    except ValueError as err:
        return user_error(err)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

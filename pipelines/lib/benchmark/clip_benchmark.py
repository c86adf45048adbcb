"""clip_benchmark's CLI, run as its users run it, and its results as one table.

clip_benchmark 1.6.2 (its newest release) computes top-k accuracy with ``float()`` of a one-element
1-d array, which numpy >= 2.4 refuses (TypeError). With such a numpy its CLI runs here unchanged but
for that one function, replaced by the same sum written with ``.item()``; with numpy < 2.4 (or
``clip_benchmark=<an executable>`` from an environment that has it) nothing is replaced.

Shape of a row: dataset, task, then the metrics clip_benchmark reports for that task (``acc1``,
``acc5``, ``mean_per_class_recall``; ``image_retrieval_recall@k``, ``text_retrieval_recall@k``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from uta_core.errors import RunCannotContinue

ACCURACY_SHIM = """
import clip_benchmark.metrics.zeroshot_classification as zc
def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
zc.accuracy = accuracy
"""
CLI = """
import sys
{shim}
from clip_benchmark.cli import main
sys.argv[0] = "clip_benchmark"
sys.exit(main())
"""
RETRIEVAL_DATASETS = ("flickr30k", "flickr8k", "mscoco_captions", "multilingual_mscoco_captions", "flickr30k-200",
                      "crossmodal3600", "xtd10", "xtd200")  # clip_benchmark's get_dataset_default_task


def needs_shim() -> bool:
    return tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)


def command(executable: str | None) -> list[str]:
    """The clip_benchmark command: a given executable, else this interpreter (with the shim if needed)."""
    if executable:
        return [executable]
    return [sys.executable, "-c", CLI.format(shim=ACCURACY_SHIM if needs_shim() else "")]


def task_of(dataset: str, root: str) -> str:
    """clip_benchmark's task for a dataset; a ``wds/`` dataset says so in its ``dataset_type.txt``."""
    if dataset.startswith("wds/"):
        kind = Path(root, "dataset_type.txt")
        return "zeroshot_retrieval" if kind.is_file() and kind.read_text().strip() == "retrieval" else \
            "zeroshot_classification"
    return "zeroshot_retrieval" if dataset in RETRIEVAL_DATASETS else "zeroshot_classification"


def eval_args(model_dir: Path, dataset: str, root: str, task: str, output: Path, options: list[str]) -> list[str]:
    """The arguments of one ``clip_benchmark eval`` of a local-dir open_clip model."""
    return ["eval", "--model", f"local-dir:{model_dir.resolve()}", "--pretrained", "none", "--dataset", dataset,
            "--dataset_root", root, "--task", task, "--recall_k", "1", "5", "10", "--output", str(output), *options]


def run_one(cmd: list[str], model_dir: Path, dataset: str, root: str, task: str, output: Path,
            options: list[str]) -> dict:
    """One ``clip_benchmark eval``; its metrics. Its own output (progress bars) goes to stderr as it runs;
    stdout stays the job's JSON."""
    args = eval_args(model_dir, dataset, root, task, output, options)
    sys.stderr.flush()
    code = subprocess.run([*cmd, *args], stdout=sys.stderr, stderr=sys.stderr).returncode
    if code != 0 or not output.is_file():
        raise RunCannotContinue(f"clip_benchmark failed on {dataset} (exit {code}; its output is above): "
                                f"clip_benchmark {' '.join(args)}")
    return json.loads(output.read_text())["metrics"]


def write_table(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    """``table.csv`` and ``table.md``: one row per dataset, a column per metric (blank where n/a)."""
    columns = ["dataset", "task"] + sorted({k for r in rows for k in r} - {"dataset", "task"})
    csv_path, md_path = folder / "table.csv", folder / "table.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{100 * v:.1f}" if isinstance(v, float) else str(r.get(c, "")) for c, v in
                 ((c, r.get(c, "")) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path

"""The demo's outputs a person looks at: the loss curves and the results table."""

from __future__ import annotations

from pathlib import Path

from pipelines.lib.demo.config import DemoConfig, Paths
from uta_core import tracking


def mlflow_history(uri: str, run_id: str | None, key: str) -> list[tuple[int, float]]:
    if not run_id:
        return []
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def plot_curves(path: Path, teacher_loss, student_loss, student_zs, results: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2)
    ax_t.plot([s for s, _ in teacher_loss], [v for _, v in teacher_loss])
    ax_t.set(title=f"CLIP teacher (captions): zero-shot {results['teacher']:.1%}", xlabel="step",
             ylabel="contrastive loss")
    ax_s.plot([s for s, _ in student_loss], [v for _, v in student_loss], label="UTA loss (-cosine)")
    ax_s.set(title=f"UTA student (images only): zero-shot {results['student']:.1%}", xlabel="step",
             ylabel="loss")
    if student_zs:
        ax_z = ax_s.twinx()
        ax_z.plot([s for s, _ in student_zs], [v for _, v in student_zs], "o-", color="tab:green",
                  label="student zero-shot")
        ax_z.axhline(results["teacher"], color="tab:red", ls="--", label="teacher zero-shot")
        ax_z.axhline(results["control"], color="tab:gray", ls=":", label="untrained control")
        ax_z.set(ylabel="zero-shot top-1", ylim=(0, 1))
        ax_z.legend(loc="center right", fontsize=8)
    fig.savefig(path, dpi=110)


MODELS = ("teacher", "student", "control")
KS = (1, 5, 10)


def retrieval_rows(retrieval: dict[str, dict[str, float]]) -> dict[str, list]:
    """Recall@k per model as table columns (MLflow's table artefact)."""
    table: dict[str, list] = {"model": list(MODELS)}
    for direction in ("i2t", "t2i"):
        for k in KS:
            table[f"{direction} R@{k}"] = [retrieval[m][f"retrieval_{direction}_r{k}"] for m in MODELS]
    return table


def print_retrieval(retrieval: dict[str, dict[str, float]], images: int, texts: int) -> None:
    print(f"Retrieval on the same {images} digits and their {texts} distinct captions: recall@k, i2t = image->text, "
          "t2i = text->image (images that share a caption share its text)")
    head = "".join(f"{f'{d} R@{k}':>10}" for d in ("i2t", "t2i") for k in KS)
    print(f"  {'model':<36}{head}")
    names = {"teacher": "CLIP teacher", "student": "UTA student", "control": "untrained control"}
    for model in MODELS:
        row = retrieval[model]
        cells = "".join(f"{row[f'retrieval_{d}_r{k}']:>10.1%}" for d in ("i2t", "t2i") for k in KS)
        print(f"  {names[model]:<36}{cells}")


def print_table(results: dict, times: dict[str, float], paths: Paths, cfg: DemoConfig, files: dict) -> None:
    chance = 1.0 / results["classes"]
    ratio = results["ratio"]
    rows = [
        ("CLIP teacher (trained on captions)", results["teacher"], ""),
        ("UTA student (train images only)", results["student"], f"{ratio:.1%} of the teacher"),
        ("untrained student (control)", results["control"], f"chance is {chance:.0%}"),
    ]
    print()
    print(f"Zero-shot top-1 on {results['images']} held-out digits ({results['classes']} classes), "
          "classifier = the teacher's text tower on class names x templates")
    print(f"  {'model':<36} {'top-1':>6}")
    for name, acc, note in rows:
        print(f"  {name:<36} {acc:>6.1%}   {note}")
    ok = ratio >= cfg.expect.min_ratio and results["control"] <= cfg.expect.max_control
    verdict = "holds" if ok else "does NOT hold in this run"
    print(f"  claim (student >= {cfg.expect.min_ratio:.0%} of teacher, control <= {cfg.expect.max_control:.0%}): "
          f"{verdict}")
    print_retrieval(results["retrieval"], results["images"], results["caption_texts"])
    print("Time: " + " | ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"Outputs: {paths.work}")
    for name, value in files.items():
        print(f"  {name:<16} {value}")
    print(f"MLflow experiment '{cfg.experiment}' (runs: demo, demo-teacher, demo-cache, demo-student):")
    print(tracking.where_runs_are(paths.tracking_uri, experiment=cfg.experiment))

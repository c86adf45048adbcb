"""Students as CLIP tooling loads them: open_clip and clip_benchmark (``local-dir:``), plain timm
(trunk, CLIP-space embedding, fine-tuning head), an MLflow model, and retrieval recall.

The references are the third-party packages themselves: open_clip builds the CLIP from the
folder, clip_benchmark's own CLI runs it, timm's ``create_model`` reads the export.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from helpers import write_clip_benchmark_dataset, write_model_config
from safetensors.torch import load_file

from pipelines import export as export_cli
from uta_core.data.digits import CLASS_NAMES, TEMPLATES
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options
from uta_core.eval.data import load_caption_set, load_eval_set
from uta_core.eval.evaluator import caption_bank, retrieval_metrics, teacher_classifier, zeroshot_accuracy
from uta_core.eval.zeroshot import caption_positives, recall_at_k
from uta_core.models.export import export_student
from uta_core.models.open_clip_export import load_open_clip, write_open_clip
from uta_core.models.student import StudentConfig, UTAStudent
from uta_core.models.teacher import TeacherConfig, build_teacher

ARCH_NAME = "uta-test-clip-tooling"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = write_model_config(tmp_path_factory.mktemp("arch"), name=ARCH_NAME)
    return build_teacher(TeacherConfig(arch=str(path)), random_seed=3)


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(5)
    return UTAStudent(StudentConfig(variant="nano", img_size=32, patch_size=4, out_dim=teacher.embed_dim)).eval()


@pytest.fixture()
def clip_dir(tmp_path, student, teacher):
    folder = tmp_path / "export"
    export_student(student, folder, mean=teacher.mean, std=teacher.std,
                   extra={"teacher": {"arch": teacher.arch, "pretrained": None}})
    write_open_clip(folder, teacher.model, teacher.arch)
    return folder


def test_open_clip_loads_the_student_image_tower_and_the_teachers_text_tower(clip_dir, student, teacher):
    model, preprocess, tokenizer = load_open_clip(clip_dir)
    x = torch.randn(3, 3, 32, 32)
    texts = ["a photo of the digit one", "the digit seven."]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), student(x)[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokenizer(texts)), teacher.encode_text(texts),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.logit_scale, teacher.model.logit_scale)
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(teacher.mean) and tuple(normalize.std) == pytest.approx(teacher.std)


def test_the_benchmark_table_is_clip_benchmarks_cli_and_gives_our_accuracy_and_recall(
        clip_dir, student, teacher, digits_webdataset, tmp_path):
    """``pipelines/benchmark.py`` (as users run it) over a labelled and a captioned clip_benchmark
    ``wds/`` dataset: its table's top-1/top-5 and recall@1/5/10 are ours on the same images."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset
    from PIL import Image

    pixels, labels = load_eval_set(InputConfig(paths=[str(digits_webdataset.root)]), S3Options(), 32, 1000)
    write_clip_benchmark_dataset(tmp_path / "wds" / "digits", pixels, labels, CLASS_NAMES, TEMPLATES)
    cap_pixels, captions = load_caption_set(InputConfig(paths=[str(digits_webdataset.root)]), S3Options(), 32, 1000)
    captions = [f"{c} number {i}" for i, c in enumerate(captions)]  # distinct: the usual retrieval benchmark
    pairs = [(Image.fromarray(p.numpy()), [c]) for p, c in zip(cap_pixels, captions)]
    convert_retrieval_dataset(pairs, "test", str(tmp_path / "wds" / "digit_captions"),
                              transform=PIL_to_bytes("png"), verbose=False)
    (tmp_path / "wds" / "digit_captions" / "dataset_type.txt").write_text("retrieval\n")
    out, db = tmp_path / "bench", f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "benchmark.py"), f"model={clip_dir}",
                           "datasets=[wds/digits,wds/digit_captions]", f"dataset_root={tmp_path / 'wds'}/{{dataset}}",
                           f"output={out}", "num_workers=0", "amp=false", f"tracking.tracking_uri={db}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["dataset"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert [(r["dataset"], r["task"]) for r in rows.values()] == [
        ("wds/digits", "zeroshot_classification"), ("wds/digit_captions", "zeroshot_retrieval")]
    weights_DC = teacher_classifier(teacher, CLASS_NAMES, TEMPLATES)["weights"]
    ours = zeroshot_accuracy(student, pixels, labels, weights_DC, teacher.mean, teacher.std)
    assert float(rows["wds/digits"]["acc1"]) == pytest.approx(ours["zeroshot_top1"], abs=1e-6)
    assert float(rows["wds/digits"]["acc5"]) == pytest.approx(ours["zeroshot_top5"], abs=1e-6)
    recall = retrieval_metrics(student, cap_pixels, captions, caption_bank(teacher.encode_text, captions),
                               teacher.mean, teacher.std)
    for k in (1, 5, 10):  # clip_benchmark: image retrieval = text -> image, text retrieval = image -> text
        assert float(rows["wds/digit_captions"][f"image_retrieval_recall@{k}"]) == pytest.approx(
            recall[f"retrieval_t2i_r{k}"], abs=1e-6)
        assert float(rows["wds/digit_captions"][f"text_retrieval_recall@{k}"]) == pytest.approx(
            recall[f"retrieval_i2t_r{k}"], abs=1e-6)
    assert "| wds/digits | zeroshot_classification |" in (out / "table.md").read_text()
    client = mlflow.tracking.MlflowClient(db)
    run = client.get_run(json.loads(proc.stdout)["mlflow_run_id"])
    assert run.data.metrics["wds/digits/acc1"] == pytest.approx(ours["zeroshot_top1"], abs=1e-6)
    assert run.data.metrics["wds/digit_captions/image_retrieval_recall_at1"] == pytest.approx(
        recall["retrieval_t2i_r1"], abs=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"table.csv", "table.md", "digits.json"}


def test_plain_timm_gets_the_trunk_the_clip_embedding_and_a_new_classifier(clip_dir, student):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trunk = timm.create_model(f"local-dir:{clip_dir}", pretrained=True).eval()
        torch.testing.assert_close(trunk(x), student.trunk.forward_features(x)[:, 0])
        # The README's recipe for the CLIP-space embedding: a classifier of out_dim + head.safetensors.
        embedder = timm.create_model(f"local-dir:{clip_dir}", pretrained=True)
        embedder.reset_classifier(student.out_dim)
        embedder.head.load_state_dict(load_file(clip_dir / "head.safetensors"))
        torch.testing.assert_close(embedder.eval()(x), student(x)[:, 0])
    # Fine-tuning: a fresh 10-way classifier on the pretrained trunk.
    tuned = timm.create_model(f"local-dir:{clip_dir}", pretrained=True, num_classes=10)
    assert tuned.head.out_features == 10
    torch.testing.assert_close(tuned.patch_embed.proj.weight, student.trunk.patch_embed.proj.weight)


def test_a_moved_export_is_relinked_by_the_export_command(clip_dir, student, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(clip_dir, moved)
    shutil.rmtree(clip_dir)
    with pytest.raises(Exception):
        load_open_clip(moved)  # its config still names the old folder for timm
    assert export_cli.main([f"model={moved}"]) == 0
    model, _, _ = load_open_clip(moved)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), student(x)[:, 0], atol=1e-5, rtol=1e-5)


def test_export_command_writes_a_clip_folder_and_a_registered_mlflow_model(clip_dir, student, teacher, tmp_path,
                                                                            capsys):
    out, db = tmp_path / "release", tmp_path / "mlflow.db"
    code = export_cli.main([f"model={clip_dir}", f"output={out}", "teacher_random_seed=3",
                            f"tracking.tracking_uri=sqlite:///{db}", "tracking.register_as=uta-test-student"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    model, _, tokenizer = load_open_clip(out)
    x = torch.rand(2, 3, 32, 32)
    x_normed = (x - torch.tensor(teacher.mean)[:, None, None]) / torch.tensor(teacher.std)[:, None, None]
    with torch.no_grad():
        expected = student(x_normed)
        torch.testing.assert_close(model.encode_image(x_normed), expected[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokenizer(["the digit two."])),
                                   teacher.encode_text(["the digit two."]), atol=1e-5, rtol=1e-5)
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    logged = mlflow.pytorch.load_model(result["mlflow_model_uri"])
    registered = mlflow.pyfunc.load_model("models:/uta-test-student/1")
    with torch.no_grad():
        torch.testing.assert_close(logged(x), expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(registered.predict(x.numpy())), expected[:, 0], atol=1e-5, rtol=1e-5)
    assert registered.metadata.get_input_schema().inputs[0].shape == (-1, 3, 32, 32)
    model_id = result["mlflow_model_uri"].removeprefix("models:/")  # "Logged from" in the UI: the pipeline
    assert mlflow.get_logged_model(model_id).tags["mlflow.source.name"] == "pipelines/export.py"


def test_export_command_refuses_what_it_cannot_use(clip_dir, tmp_path, capsys):
    assert export_cli.main([f"model={clip_dir}", "output=s3://bucket/x"]) == 2
    assert "must be a local folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert export_cli.main([f"model={clip_dir}", f"output={tmp_path / 'full'}"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export_cli.main([f"model={tmp_path / 'full'}"]) == 2
    assert "not a student export" in capsys.readouterr().err


# --------------------------------------------------------------------- retrieval
def test_recall_counts_shared_captions_once_and_matches_brute_force():
    captions = ["a", "b", "a", "c", "b", "a"]
    texts, positives = caption_positives(captions)
    assert texts == ["a", "b", "c"] and positives.sum(1).tolist() == [1] * 6
    torch.manual_seed(0)
    text_emb = torch.randn(3, 8)
    perfect = text_emb[[texts.index(c) for c in captions]]  # each image sits on its caption
    got = recall_at_k(perfect, text_emb, positives, ks=(1,))
    assert got == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}
    images = torch.randn(6, 8)
    got = recall_at_k(images, text_emb, positives, ks=(1, 2))
    sim = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).T
    for k in (1, 2):
        i2t = sum(positives[i, sim[i].topk(k).indices].any().item() for i in range(6)) / 6
        t2i = sum(positives[sim[:, t].topk(k).indices, t].any().item() for t in range(3)) / 3
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t) and got[f"text_to_image_R@{k}"] == pytest.approx(t2i)


def test_retrieval_metrics_of_the_student_against_clip_benchmark_style_recall(student, teacher, digits_webdataset):
    pixels, captions = load_caption_set(InputConfig(paths=[str(digits_webdataset.root)]), S3Options(), 32, 1000)
    assert len(captions) == 30 and pixels.shape == (30, 32, 32, 3)
    bank = caption_bank(teacher.encode_text, captions)
    metrics = retrieval_metrics(student, pixels, captions, bank, teacher.mean, teacher.std)
    assert set(metrics) == {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert metrics["retrieval_i2t_r10"] == 1.0  # ten distinct captions: all of them are in the top 10
    with pytest.raises(ValueError, match="no text embedding"):
        retrieval_metrics(student, pixels, captions, caption_bank(teacher.encode_text, captions[:3]),
                          teacher.mean, teacher.std)

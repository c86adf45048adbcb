"""A released UTA checkpoint's own text tower against the official code (tests/reference/uta_official,
unmodified): ``text_transformer()`` at the official shape and at a small one, random weights, loaded
into open_clip's ``TextTransformer`` (``uta_core.models.official_text``); and a whole official CLIP
(the UTA-B/16 image tower + a text tower) exported by ``pipelines/export.py`` to an open_clip folder
whose ``encode_image`` / ``encode_text`` / ``logit_scale`` are the official ``CLIP``'s."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from helpers import run_clip_benchmark

from uta_core.models.official_text import build_official_text, official_text_config

sys.path.insert(0, str(Path(__file__).parent / "reference"))
with contextlib.redirect_stdout(io.StringIO()):  # it prints a hint when xformers is missing
    from uta_official import eva_vit as official_vit  # noqa: E402
    from uta_official.transformer import TextTransformer  # noqa: E402

PROMPTS = ["a photo of a dog.", "an origami crane on a wooden table", "a photo of the digit seven."]


def official_text(width: int, layers: int, heads: int, output_dim: int) -> TextTransformer:
    """The official ``text_transformer()`` settings (xattn) at any size, random weights; its attention
    on the explicit softmax path (no xformers on a CPU): the same arithmetic, the same parameters."""
    torch.manual_seed(0)
    tower = TextTransformer(width=width, layers=layers, heads=heads, output_dim=output_dim, xattn=True)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias") or "ln_" in name:  # zeros/ones would hide a mix-up
                p.add_(torch.randn_like(p) * 0.1)
    for block in tower.transformer.resblocks:
        block.attn.xattn = False
    return tower.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("width, layers, heads, output_dim", [(128, 2, 2, 32), (1024, 24, 16, 1024)],
                         ids=["small", "official-shape"])
def test_the_text_tower_equals_the_official_text_transformer(width, layers, heads, output_dim):
    tower = official_text(width, layers, heads, output_dim)
    state = tower.state_dict()
    cfg = official_text_config(state)
    assert cfg == {"embed_dim": output_dim, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width,
                                                         "heads": heads, "layers": layers, "mlp_ratio": 4.0}}
    ours = build_official_text(state)
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)  # the official script's tokenizer
    with torch.no_grad():
        assert rel(ours(tokens), tower(tokens)) < 1e-4
    del tower, ours


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released UTA-B/16 checkpoint file with random weights: the official image tower (224 px,
    patch 16, 1024-d head), a small official text tower into the same space and ``logit_scale``; and
    the official ``CLIP`` holding those very modules."""
    from uta_official import CLIP

    with contextlib.redirect_stdout(io.StringIO()):
        visual = official_vit.eva_base_p16()
    for block in visual.blocks:
        block.attn.xattn = False
    visual.eval()
    text = official_text(128, 2, 2, 1024)
    logit_scale = torch.tensor(float(np.log(1 / 0.07)))  # the official CLIP's initial value
    clip = CLIP.__new__(CLIP)  # its own __init__ would build the full-size text tower first
    torch.nn.Module.__init__(clip)
    clip.visual, clip.text, clip.logit_scale = visual, text, torch.nn.Parameter(logit_scale.clone())
    path = tmp_path_factory.mktemp("released") / "UTA-B.pt"
    torch.save(clip.state_dict(), path)
    return SimpleNamespace(path=path, clip=clip.eval(), logit_scale=logit_scale)


@pytest.fixture(scope="module")
def released_export(released, tmp_path_factory) -> SimpleNamespace:
    """``pipelines/export.py model=UTA-B.pt output=...``: the checkpoint as an open_clip / timm folder."""
    from pipelines.lib.export.job import ExportConfig, run

    folder = tmp_path_factory.mktemp("released_export") / "export"
    return SimpleNamespace(folder=folder, result=run(ExportConfig(model=str(released.path), output=str(folder))))


def test_a_released_checkpoint_exports_to_an_open_clip_clip_with_its_own_text_tower(released, released_export):
    from uta_core.models.open_clip_export import load_open_clip

    assert released_export.result["teacher"] == "the checkpoint's own"
    model, preprocess, tokenizer = load_open_clip(released_export.folder)
    assert type(model).__name__ == "CLIP"  # an ordinary open_clip CLIP
    images = torch.randn(2, 3, 224, 224)
    tokens = tokenizer(PROMPTS)
    with torch.no_grad():
        assert rel(model.encode_image(images), released.clip.encode_image(images)) < 1e-4
        assert rel(model.encode_text(tokens), released.clip.encode_text(tokens)) < 1e-4
        assert float(model.logit_scale) == pytest.approx(float(released.logit_scale))
    assert preprocess.transforms[0].size == 224  # resize shortest side, centre crop, OpenAI mean/std
    assert list(preprocess.transforms[-1].mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


# --------------------------------------------------------------------- the official zero-shot protocol
def official_zeroshot_script():
    """``imagenet_zeroshot_eval.py`` as the official repository has it: its ``eva_vit_model`` and
    ``imagenet_zeroshot_data`` imports resolve to the vendored copies; ``zero_shot_eval`` reads a
    global ``args`` (set in the script's ``__main__``), given here."""
    import uta_official
    from uta_official import imagenet_zeroshot_data

    sys.modules.setdefault("eva_vit_model", uta_official)
    sys.modules.setdefault("imagenet_zeroshot_data", imagenet_zeroshot_data)
    script = importlib.import_module("uta_official.imagenet_zeroshot_eval")
    script.args = SimpleNamespace(batch_size=BATCH)
    # Its accuracy() calls float() on a 1-element array, which numpy >= 2.4 refuses (as in clip_benchmark
    # 1.6.2); a module-level float that reads the element gives what older numpy gave.
    script.float = lambda x: float(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else float(x)
    return script, imagenet_zeroshot_data


BATCH = 8
CLASSES = 10  # the first ten ImageNet classes; the labelled images are digits 0-9 in ImageFolder layout


def write_image_folder(root: Path, per_class: int) -> Path:
    """Digits as RGB PNGs of several non-square sizes (the resize and the crop both matter), one
    folder per class, named so that sorted folder order is class order (ImageFolder's labels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    sizes = [(40, 30), (30, 52), (64, 64), (23, 41)]
    for c in range(CLASSES):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == c)[:per_class]):
            gray = (digits.images[index] * 255 / 16).astype(np.uint8)
            img = Image.fromarray(gray).convert("RGB").resize(sizes[i % len(sizes)], Image.Resampling.BILINEAR)
            img.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet") / "val", per_class=2)


@pytest.mark.ray
def test_evaluate_zeroshot_gives_the_official_scripts_and_clip_benchmarks_accuracy(released, released_export,
                                                                                    val_folder, ray_local, tmp_path):
    """The official script's ``zero_shot_classifier`` + ``zero_shot_eval`` (its transform copied from
    its ``main``) against ``evaluate.py zeroshot`` (decoding on Ray Data tasks, encoding on an actor)
    on the same checkpoint file and images: the same classifier (1e-4), the same top-1 and top-5.
    clip_benchmark's CLI on the checkpoint's export, given the same images (its own transform),
    reports them too. ``classes=imagenet`` is the official script's class names and 80 templates."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode

    from pipelines.lib.evaluate.job import EvaluateConfig, evaluate, text_encoder
    from uta_core.data.shards import InputConfig
    from uta_core.data.storage import S3Options
    from uta_core.eval.zeroshot import build_classifier, templates_and_classnames
    from uta_core.models.trained import load_trained_student
    from uta_core.tracking import TrackingConfig

    script, data = official_zeroshot_script()
    imagenet = templates_and_classnames("imagenet")
    assert list(imagenet.classnames) == data.imagenet_classnames
    assert [t("{}") for t in imagenet.templates] == [t("{}") for t in data.openai_imagenet_template]

    root = val_folder
    classnames = data.imagenet_classnames[:CLASSES]
    templates = data.openai_imagenet_template
    val_transform = transforms.Compose([  # the official main()'s, verbatim (image_size 224)
        transforms.Resize(224, InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        lambda image: image.convert("RGB"), transforms.ToTensor(),
        transforms.Normalize(mean=script.OPENAI_CLIP_MEAN, std=script.OPENAI_CLIP_STD)])
    loader = DataLoader(datasets.ImageFolder(str(root), transform=val_transform), batch_size=BATCH)
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        theirs_DC = script.zero_shot_classifier(released.clip, classnames, templates, "cpu")
        top1, top5 = script.zero_shot_eval(released.clip, theirs_DC, loader, "cpu")

    cfg = EvaluateConfig(model=str(released.path), input=InputConfig(paths=[str(root)]), classnames=classnames,
                         templates=[t("{}") for t in templates], batch_size=BATCH, device="cpu",
                         tracking=TrackingConfig(enabled=False))
    _, _, _, info = load_trained_student(cfg.model, S3Options())
    encode_text, source = text_encoder(cfg, info, "cpu")
    assert source == "the checkpoint's own"
    assert rel(build_classifier(encode_text, cfg.classnames, cfg.templates), theirs_DC) < 1e-4
    result = evaluate(cfg)
    assert result["images"] == 2 * CLASSES and result["text_tower"] == "the checkpoint's own"
    assert (result["zeroshot_top1"], result["zeroshot_top5"]) == (pytest.approx(top1), pytest.approx(top5))
    assert 0 < top5 < 1  # neither trivially empty nor full: the comparison can fail
    bench = run_clip_benchmark(released_export.folder, clip_benchmark_set(val_folder, cfg.classnames, cfg.templates,
                                                                          tmp_path / "wds"), tmp_path / "cb.json")
    assert (bench["acc1"], bench["acc5"]) == (pytest.approx(top1), pytest.approx(top5))


def clip_benchmark_set(folder: Path, classnames: list[str], templates: list[str], root: Path) -> Path:
    """The image folder's original (non-square) images as a clip_benchmark ``wds/`` dataset."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
    from PIL import Image

    class Labelled(list):  # its converter reads .classes and .templates
        pass

    images = Labelled((Image.open(f).convert("RGB"), c) for c, name in enumerate(sorted(p.name for p in
                      folder.iterdir())) for f in sorted((folder / name).glob("*.png")))
    images.classes, images.templates = list(classnames), [t.replace("{}", "{c}") for t in templates]
    convert_dataset(images, "test", str(root), transform=PIL_to_bytes("png"), verbose=False)
    return root


# --------------------------------------------------------------------- stage 2 from a released model
def test_stage_two_starts_from_a_released_checkpoint_with_its_own_text_tower(released, tmp_path):
    """``model.student=UTA-B.pt model.teacher=null``: the image tower and the text tower both start from
    the checkpoint; at a learning rate too small to move them, the export's towers are the official
    CLIP's."""
    from pipelines.lib.contrastive import job as contrastive
    from pipelines.lib.contrastive.config import ContrastiveJobConfig
    from pipelines.lib.train.backends import InProcess
    from uta_core.config import load_config
    from uta_core.data.digits import write_digits_splits
    from uta_core.models.open_clip_export import load_open_clip

    write_digits_splits(tmp_path / "digits", size=224, limit=40, samples_per_shard=8)
    stage2 = Path(__file__).resolve().parents[1] / "configs" / "contrastive_stage2.yaml"
    cfg = load_config(ContrastiveJobConfig, stage2, [
        f"model.student={released.path}", "model.teacher=null", f"data.input.paths={tmp_path / 'digits' / 'train'}",
        "data.decode_size=null", "cluster.num_workers=1", "train.micro_batch=4", "train.max_steps=1",
        "optim.lr=1e-12", "optim.min_lr=0", "optim.weight_decay=0", "run.name=stage2",
        f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"])
    report = contrastive.run(cfg, InProcess())
    model, _, tokenizer = load_open_clip(report["export"])
    images, tokens = torch.randn(2, 3, 224, 224), tokenizer(PROMPTS)
    with torch.no_grad():
        assert rel(model.encode_image(images), released.clip.encode_image(images)) < 1e-4
        assert rel(model.encode_text(tokens), released.clip.encode_text(tokens)) < 1e-4
    assert float(model.logit_scale.exp()) == pytest.approx(100.0)  # stage 2: temperature fixed at 0.01

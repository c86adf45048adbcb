"""Views: seeded, reproducible from recorded parameters, torchvision-equivalent crops."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import functional as TF

from uta_core.data.views import (
    ImageDecodeError,
    ViewConfig,
    center_view,
    decode_image,
    render_view,
    sample_views,
    to_model_input,
    view_seed,
)


def digit_image(i=0, size=64) -> Image.Image:
    pixels = (load_digits().images[i] * (255 / 16)).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size)).convert("RGB")


def test_views_are_seeded_per_key_and_view():
    img = digit_image()
    cfg = ViewConfig(size=32, seed=7)
    a = sample_views(img, "k1", 4, cfg)
    b = sample_views(img, "k1", 4, cfg)
    c = sample_views(img, "k2", 4, cfg)
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert [p for p, _ in a] != [p for p, _ in c]
    assert len({p for p, _ in a}) == 4  # views of one image differ
    assert view_seed(0, "k", 1) != view_seed(1, "k", 1)


def test_recorded_params_rebuild_the_view_like_torchvision():
    img = digit_image(3, size=80)
    cfg = ViewConfig(size=32, scale=(0.2, 1.0))
    for params, pixels in sample_views(img, "x", 8, cfg):
        assert render_view(img, params, 32).tobytes() == pixels.tobytes()
        ref = TF.resized_crop(
            img, params.top, params.left, params.height, params.width, [32, 32],
            interpolation=TF.InterpolationMode.BICUBIC,
        )
        if params.flip:
            ref = TF.hflip(ref)
        assert np.array_equal(np.asarray(ref), pixels)
        area = params.height * params.width / (80 * 80)
        assert 0.2 - 0.02 <= area <= 1.0


def test_flip_frequency_and_no_flip_option():
    img = digit_image()
    flips = [p.flip for p, _ in sample_views(img, "k", 400, ViewConfig(size=16))]
    assert 0.4 < np.mean(flips) < 0.6
    assert not any(p.flip for p, _ in sample_views(img, "k", 50, ViewConfig(size=16, hflip=False)))


def test_decode_rejects_truncated_and_garbage():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_image(data).size == (16, 16)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")


def test_decode_converts_to_rgb():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


def test_center_view_and_normalisation():
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    pixels = center_view(img, 16)
    assert pixels.shape == (16, 16, 3)
    x = to_model_input(torch.from_numpy(pixels.copy())[None], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)),
                                    dict(ratio=(2.0, 1.0))])
def test_view_config_errors(kwargs):
    with pytest.raises(ValueError):
        ViewConfig(**kwargs)


def test_digits_shards_are_img2dataset_style_and_split_is_disjoint(tmp_path):
    import tarfile

    from uta_core.data.digits import CLASS_NAMES, write_digits_splits

    splits = write_digits_splits(tmp_path, size=16, samples_per_shard=100, limit=300)
    keys = {}
    for name, paths in splits.items():
        keys[name] = set()
        for path in paths:
            with tarfile.open(path) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for member, data in members.items():
                key, ext = member.split(".")
                keys[name].add(key)
                if ext == "txt":
                    label = int(members[f"{key}.cls"])
                    assert data.decode() == f"a photo of the digit {CLASS_NAMES[label]}"
                if ext == "png":
                    assert decode_image(data).size == (16, 16)
    assert len(keys["train"]) + len(keys["heldout"]) == 300
    assert not keys["train"] & keys["heldout"]
    assert 50 <= len(keys["heldout"]) <= 70

"""Cache format: token codecs against plain references, manifest round trip and settings hash, row decoding."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from uta_core.cache.codecs import LowRankBasis, TokenCodec, dequantize_int8, fit_basis, quantize_int8
from uta_core.cache.format import (
    VIEW_SCHEMA,
    CacheSettings,
    Manifest,
    PartRecord,
    ShardRecord,
    byte_rows,
    cache_schema,
    decode_pixels,
    encode_view,
    settings_diff,
    tokens_array,
)
from uta_core.cache.reader import read_cache_rows


def settings(**changes) -> CacheSettings:
    base = dict(
        teacher={"arch": "ViT-B-16", "pretrained": "openai", "fingerprint": "abc", "embed_dim": 4,
                 "patch_size": 16, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "precision": "bf16"},
        grid=[2, 2], token_shape=[5, 4], token_codec="float16", token_rank=None, pixel_format="png",
        views={"size": 32, "scale": [0.2, 1.0], "ratio": [0.75, 1.33], "hflip": True, "seed": 0, "num_views": 2},
    )
    base.update(changes)
    return CacheSettings(**base)


def test_int8_tokens_keep_the_cosine_not_the_norm():
    gen = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(4, 17, 256, generator=gen) * 7.0
    q_BTD = quantize_int8(x_BTD)
    assert q_BTD.dtype == torch.int8 and bool((q_BTD.abs().amax(-1) == 127).all())  # full range per token
    restored_BTD = dequantize_int8(q_BTD)
    cos_BT = torch.nn.functional.cosine_similarity(restored_BTD, x_BTD, dim=-1)
    assert cos_BT.min() > 0.9999
    torch.testing.assert_close(restored_BTD.norm(dim=-1), torch.ones(4, 17))
    assert torch.equal(quantize_int8(restored_BTD), q_BTD)  # a fixed point
    # The plain reference: |error| per component is at most half a step of the absmax scale.
    step_BT1 = x_BTD.abs().amax(-1, keepdim=True) / 127
    assert bool(((q_BTD.float() * step_BT1 - x_BTD).abs() <= step_BT1 / 2 + 1e-5).all())


def low_rank_tokens(B=64, N=49, D=96, rank=8, noise=0.01, seed=0) -> torch.Tensor:
    """Tokens on a rank-``rank`` affine subspace plus a little isotropic noise, CLS first."""
    gen = torch.Generator().manual_seed(seed)
    mean_D, basis_RD = torch.randn(D, generator=gen), torch.randn(rank, D, generator=gen)
    patches = mean_D + torch.randn(B, N, rank, generator=gen) @ basis_RD + noise * torch.randn(B, N, D, generator=gen)
    return torch.cat([torch.randn(B, 1, D, generator=gen) * 3, patches], dim=1)


@pytest.mark.parametrize("name", ["float16", "int8"])
def test_dense_codecs_round_trip(name):
    x_BTD = torch.randn(2, 5, 4) * 3
    codec = TokenCodec(name=name, token_shape=(5, 4))
    stored_BS = codec.encode(x_BTD)
    assert stored_BS.dtype == np.uint8 and stored_BS.shape == (2, codec.bytes_per_view)
    restored_BTD = codec.decode(stored_BS)
    if name == "float16":
        assert codec.bytes_per_view == 2 * 5 * 4
        torch.testing.assert_close(restored_BTD, x_BTD.half().float(), rtol=0, atol=0)
    else:
        assert codec.bytes_per_view == 5 * 4
        np.testing.assert_array_equal(stored_BS.view(np.int8).reshape(2, 5, 4), quantize_int8(x_BTD).numpy())
        torch.testing.assert_close(restored_BTD, dequantize_int8(quantize_int8(x_BTD)))
    with pytest.raises(ValueError, match="uint8"):
        codec.decode(stored_BS[:, :-1])


def test_lowrank_basis_is_numpy_pca_of_unit_patch_tokens():
    x_BTD = low_rank_tokens()
    basis = fit_basis(x_BTD, rank=8)
    patches = F.normalize(x_BTD[:, 1:].reshape(-1, 96).double(), dim=-1).numpy()
    centred = patches - patches.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # the plain reference
    np.testing.assert_allclose(basis.mean_D.numpy(), patches.mean(0), atol=1e-6)
    ours, ref = basis.components_DR.double().numpy(), vt[:8].T
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=1e-5)  # the same subspace (signs may differ)
    np.testing.assert_allclose(ours.T @ ours, np.eye(8), atol=1e-5)
    back = LowRankBasis.from_bytes(basis.to_bytes())
    assert torch.equal(back.mean_D, basis.mean_D) and torch.equal(back.components_DR, basis.components_DR)


def test_lowrank_codec_keeps_cls_and_restores_patch_directions():
    x_BTD = low_rank_tokens()
    # Unit-normalised points of a rank-8 affine subspace span mean + 8 directions: rank 9 holds them.
    codec = TokenCodec(name="lowrank_int8", token_shape=(50, 96), basis=fit_basis(x_BTD, rank=9))
    assert codec.bytes_per_view == 2 * 96 + 49 * (2 + 9)
    restored_BTD = codec.decode(codec.encode(x_BTD))
    torch.testing.assert_close(restored_BTD[:, 0], x_BTD[:, 0].half().float(), rtol=0, atol=0)  # CLS: fp16
    # Reference: the exact projection of each unit patch token onto mean + span (no quantisation).
    basis = codec.basis
    unit_BND = F.normalize(x_BTD[:, 1:], dim=-1)
    projected_BND = (unit_BND - basis.mean_D) @ basis.components_DR @ basis.components_DR.T + basis.mean_D
    cos_to_projection = F.cosine_similarity(restored_BTD[:, 1:], projected_BND, dim=-1)
    assert cos_to_projection.min() > 0.9995  # only int8 rounding between them
    cos_BN = F.cosine_similarity(restored_BTD[:, 1:], x_BTD[:, 1:], dim=-1)
    assert cos_BN.mean() > 0.999 and cos_BN.min() > 0.99
    torch.testing.assert_close(restored_BTD[:, 1:].norm(dim=-1), torch.ones(64, 49))
    # A basis of lower rank than the data loses what it cannot span: the cosine says so.
    small = TokenCodec(name="lowrank_int8", token_shape=(50, 96), basis=fit_basis(x_BTD, rank=2))
    assert F.cosine_similarity(small.decode(small.encode(x_BTD))[:, 1:], x_BTD[:, 1:], dim=-1).mean() < 0.9


def test_lowrank_codec_at_vit_l_geometry_is_under_an_eighth_of_fp16():
    basis = LowRankBasis(mean_D=torch.zeros(768), components_DR=torch.eye(768)[:, :64])
    fp16 = TokenCodec(name="float16", token_shape=(257, 768))
    lowrank = TokenCodec(name="lowrank_int8", token_shape=(257, 768), basis=basis)
    assert fp16.bytes_per_view == 394_752 and lowrank.bytes_per_view == 18_432
    assert lowrank.bytes_per_view * 8 <= fp16.bytes_per_view
    with pytest.raises(ValueError, match="basis"):
        TokenCodec(name="lowrank_int8", token_shape=(257, 768))


def test_manifest_round_trip_and_tamper_detection():
    m = Manifest(settings=settings(), class_names=["a", "b"])
    m.shards["00000"] = ShardRecord(source="s3://b/00000.tar", rows=4, images=2, skipped=1, errors=["k: bad"],
                                    parts=[PartRecord(file="shards/00000/a.parquet", rows=4, bytes=10,
                                                      sha256="f" * 64)], committed_at="t", compute="cpu fp32")
    back = Manifest.from_json(m.to_json())
    assert back == m and back.settings_hash == m.settings_hash
    data = json.loads(m.to_json())
    data["views"]["num_views"] = 4
    with pytest.raises(ValueError, match="settings_hash does not match"):
        Manifest.from_json(json.dumps(data))
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        Manifest.from_json(json.dumps(data))


def test_settings_hash_covers_meaning_but_not_the_weights_location():
    base = settings()
    moved = settings(teacher={**base.teacher, "pretrained": "/mnt/copy/weights.pt"})
    assert moved.hash() == base.hash() and settings_diff(base, moved) == []
    other = settings(token_codec="int8", teacher={**base.teacher, "fingerprint": "def"})
    assert other.hash() != base.hash()
    assert settings_diff(base, other) == ["teacher.fingerprint: 'abc' -> 'def'", "token_codec: 'float16' -> 'int8'"]
    assert settings(token_codec="lowrank_int8", token_rank=2).hash() != settings(token_codec="lowrank_int8",
                                                                                  token_rank=3).hash()
    with pytest.raises(ValueError, match="token_rank"):
        settings(token_codec="lowrank_int8")
    with pytest.raises(ValueError, match="token_shape"):
        settings(token_shape=[4, 4])


@pytest.mark.parametrize("pixel_format", ["png", "jpeg"])
def test_rows_written_with_the_schema_read_back_as_pixels_and_tokens(tmp_path, pixel_format):
    s = settings(pixel_format=pixel_format)
    codec = TokenCodec(name="float16", token_shape=(5, 4))
    rng = np.random.default_rng(0)
    pixels_BHW3 = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    encoded = [encode_view(p, pixel_format) for p in pixels_BHW3]
    tokens_BTD = torch.randn(3, 5, 4)
    rows = pa.Table.from_pylist([
        {"key": f"k{i}", "view": 0, "crop_top": 0, "crop_left": 0, "crop_height": 8, "crop_width": 8,
         "flip": False, "pixels": encoded[i], "label": None, "caption": None}
        for i in range(3)], schema=VIEW_SCHEMA)
    table = rows.append_column("tokens", tokens_array(codec.encode(tokens_BTD)))
    table = pa.Table.from_arrays(table.columns, schema=cache_schema(s, codec.bytes_per_view))
    pq.write_table(table, tmp_path / "x.parquet", use_dictionary=False)
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.metadata[b"uta_cache_settings_hash"] == s.hash().encode()
    got_pixels, got_tokens = read_cache_rows(back, codec)
    if pixel_format == "png":
        np.testing.assert_array_equal(got_pixels.numpy(), pixels_BHW3)  # PNG is lossless
    else:  # the one decoder every reader uses; PIL (another libjpeg build) agrees within a level or two
        import io

        from PIL import Image
        pil = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])
        assert np.abs(got_pixels.numpy().astype(int) - pil).max() <= 2
        np.testing.assert_array_equal(got_pixels.numpy(), decode_pixels(encoded))
    torch.testing.assert_close(got_tokens, tokens_BTD.half().float(), rtol=0, atol=0)
    numpy_batch = {"pixels": np.array(back.column("pixels").to_pylist(), dtype=object),
                   "tokens": np.array(back.column("tokens").to_pylist(), dtype=object)}  # Ray's numpy batch
    torch.testing.assert_close(read_cache_rows(numpy_batch, codec)[1], got_tokens)
    assert byte_rows(back.column("tokens").slice(1, 2)).tobytes() == b"".join(back.column("tokens")[1:3].to_pylist())

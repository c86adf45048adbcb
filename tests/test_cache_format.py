"""Cache format: token quantisation, manifest round trip and settings hash, row decoding."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from uta_core.cache.format import (
    TOKENS_PARQUET_ENCODING,
    CacheSettings,
    Manifest,
    ShardRecord,
    VIEW_SCHEMA,
    cache_schema,
    dequantize_int8,
    encode_view,
    quantize_int8,
    read_cache_rows,
    settings_diff,
    tokens_array,
    tokens_from_storage,
    tokens_to_storage,
)


def settings(**changes) -> CacheSettings:
    base = dict(
        teacher={"arch": "ViT-B-16", "pretrained": "openai", "fingerprint": "abc", "embed_dim": 4,
                 "patch_size": 16, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "precision": "bf16"},
        grid=[2, 2], token_shape=[5, 4], token_dtype="float16", pixel_format="png",
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


def test_storage_dtypes_round_trip():
    x_BTD = torch.randn(2, 5, 4)
    fp16 = tokens_to_storage(x_BTD, "float16")
    assert fp16.dtype == np.float16
    torch.testing.assert_close(tokens_from_storage(fp16), x_BTD, atol=2e-3, rtol=1e-3)
    stored = tokens_to_storage(x_BTD, "int8")
    assert stored.dtype == np.uint8  # int8 bytes; Parquet would widen int8 with sign extension
    np.testing.assert_array_equal(stored.view(np.int8), quantize_int8(x_BTD).numpy())
    torch.testing.assert_close(tokens_from_storage(stored), dequantize_int8(quantize_int8(x_BTD)))
    with pytest.raises(ValueError, match="token_dtype"):
        tokens_to_storage(x_BTD, "bfloat16")


def test_manifest_round_trip_and_tamper_detection():
    m = Manifest(settings=settings(), class_names=["a", "b"])
    m.shards["00000"] = ShardRecord(source="s3://b/00000.tar", rows=4, images=2, skipped=1, errors=["k: bad"],
                                    sha256="f" * 64, bytes=10, committed_at="t", compute="cpu fp32")
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
    other = settings(token_dtype="int8", teacher={**base.teacher, "fingerprint": "def"})
    assert other.hash() != base.hash()
    assert settings_diff(base, other) == ["teacher.fingerprint: 'abc' -> 'def'", "token_dtype: 'float16' -> 'int8'"]
    with pytest.raises(ValueError, match="token_shape"):
        settings(token_shape=[4, 4])


@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_rows_written_with_the_schema_read_back_as_pixels_and_tokens(tmp_path, token_dtype):
    s = settings(token_dtype=token_dtype)
    rng = np.random.default_rng(0)
    pixels_BHW3 = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    tokens_BTD = torch.randn(3, 5, 4)
    rows = pa.Table.from_pylist([
        {"key": f"k{i}", "view": 0, "crop_top": 0, "crop_left": 0, "crop_height": 8, "crop_width": 8,
         "flip": False, "pixels": encode_view(pixels_BHW3[i], "png"), "label": None, "caption": None}
        for i in range(3)], schema=VIEW_SCHEMA)
    table = rows.append_column("tokens", tokens_array(tokens_to_storage(tokens_BTD, token_dtype)))
    table = pa.Table.from_arrays(table.columns, schema=cache_schema(s))
    pq.write_table(table, tmp_path / "x.parquet", use_dictionary=False, column_encoding=TOKENS_PARQUET_ENCODING)
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.metadata[b"uta_cache_settings_hash"] == s.hash().encode()
    got_pixels, got_tokens = read_cache_rows(back)
    np.testing.assert_array_equal(got_pixels.numpy(), pixels_BHW3)  # PNG is lossless
    expected = tokens_BTD if token_dtype == "float16" else dequantize_int8(quantize_int8(tokens_BTD))
    torch.testing.assert_close(got_tokens, expected, atol=2e-3, rtol=1e-3)
    numpy_batch = {"pixels": np.array(back.column("pixels").to_pylist(), dtype=object),
                   "tokens": back.column("tokens").combine_chunks().to_numpy_ndarray()}
    torch.testing.assert_close(read_cache_rows(numpy_batch)[1], got_tokens)


def test_int8_tokens_take_at_most_a_byte_per_value_on_disk(tmp_path):
    """Parquet widens 8-bit ints to INT32; stored as uint8 bytes with BYTE_STREAM_SPLIT they stay compact."""
    x_BTD = torch.randn(64, 65, 64, generator=torch.Generator().manual_seed(0))
    sizes = {}
    for dtype in ("float16", "int8"):
        s = settings(token_dtype=dtype, token_shape=[65, 64], grid=[8, 8],
                     teacher={**settings().teacher, "embed_dim": 64})
        table = pa.table({"tokens": tokens_array(tokens_to_storage(x_BTD, dtype))})
        path = tmp_path / f"{dtype}.parquet"
        pq.write_table(table.cast(pa.schema([cache_schema(s).field("tokens")])), path, compression="zstd",
                       use_dictionary=False, column_encoding=TOKENS_PARQUET_ENCODING)
        column = pq.ParquetFile(path).metadata.row_group(0).column(0)
        sizes[dtype] = column.total_compressed_size / x_BTD.numel()
    assert sizes["int8"] < 1.0 and sizes["float16"] < 2.0 and sizes["int8"] < 0.6 * sizes["float16"]

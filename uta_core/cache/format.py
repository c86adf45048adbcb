"""The teacher-feature cache on disk (docs/CACHE_FORMAT.md): manifest, row schema, tokens.

Written by ``pipelines/cache_teacher.py``; read by pre-training and sweeps, which use
``open_cache`` (manifest + shard URIs) and ``read_cache_rows`` (a batch of rows ->
uint8 pixels + float tokens). Tokens are a fixed-shape tensor column (Arrow's canonical
``arrow.fixed_shape_tensor``), so pyarrow and ``ray.data.read_parquet`` both give them
back as (B, 1+N, D) arrays.

Shape legend: B rows (views), T = 1+N tokens (CLS first), D embed dim, H/W pixels.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image

from uta_core.config import flatten
from uta_core.data.storage import S3Options, filesystem_for, join, read_bytes, to_uri, write_bytes_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
TMP_DIR = "_tmp"
TOKEN_DTYPES = ("float16", "int8")
PIXEL_FORMATS = ("png", "jpeg")
INT8_SCALE = 127.0
# Recorded for information; a different source of bit-identical weights is the same teacher.
_UNHASHED = ("teacher.pretrained",)

VIEW_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("view", pa.int16(), nullable=False),
    pa.field("crop_top", pa.int32(), nullable=False),
    pa.field("crop_left", pa.int32(), nullable=False),
    pa.field("crop_height", pa.int32(), nullable=False),
    pa.field("crop_width", pa.int32(), nullable=False),
    pa.field("flip", pa.bool_(), nullable=False),
    pa.field("pixels", pa.binary(), nullable=False),
    pa.field("label", pa.int64()),
    pa.field("caption", pa.string()),
]
VIEW_SCHEMA = pa.schema(VIEW_FIELDS)


# --------------------------------------------------------------------- settings + manifest
@dataclass(kw_only=True)
class CacheSettings:
    """Everything that changes the meaning of a cached row; hashed to refuse mixing."""

    teacher: dict[str, Any]  # arch, pretrained, fingerprint, embed_dim, patch_size, image_size, mean, std, precision
    grid: list[int]  # [H, W] token grid
    token_shape: list[int]  # [1+N, D]
    token_dtype: str
    pixel_format: str
    views: dict[str, Any]  # num_views, size, scale, ratio, hflip, seed (+ jpeg_quality for jpeg)

    def __post_init__(self) -> None:
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {list(TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if self.pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {list(PIXEL_FORMATS)}, got {self.pixel_format!r}")
        H, W = self.grid
        if list(self.token_shape) != [1 + H * W, self.teacher["embed_dim"]]:
            raise ValueError(f"token_shape {self.token_shape} does not match grid {self.grid} + CLS")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as read back from JSON

    def hashed_items(self) -> dict[str, Any]:
        return {k: v for k, v in flatten(self.as_dict()).items() if k not in _UNHASHED}

    def hash(self) -> str:
        canonical = json.dumps(self.hashed_items(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def settings_diff(old: CacheSettings, new: CacheSettings) -> list[str]:
    """Human-readable differences of the hashed settings: ["views.num_views: 2 -> 4", ...]."""
    a, b = old.hashed_items(), new.hashed_items()
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(kw_only=True)
class ShardRecord:
    source: str  # input shard URI
    rows: int  # views written
    images: int  # images decoded
    skipped: int  # samples skipped (undecodable, truncated, no image, duplicate key)
    errors: list[str] = field(default_factory=list)  # first few skip reasons / container errors
    sha256: str = ""
    bytes: int = 0
    committed_at: str = ""
    compute: str = ""  # e.g. "cuda bf16", "cpu fp32" (informational)
    read_error: str | None = None  # set: the input broke part-way, only the rows before it are here (redone on rerun)


@dataclass(kw_only=True)
class Manifest:
    settings: CacheSettings
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    class_names: list[str] | None = None
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: now())

    @property
    def settings_hash(self) -> str:
        return self.settings.hash()

    def to_json(self) -> str:
        data = {"format_version": self.format_version, **self.settings.as_dict(),
                "settings_hash": self.settings_hash, "class_names": self.class_names,
                "created_at": self.created_at,
                "shards": {name: asdict(rec) for name, rec in sorted(self.shards.items())}}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        data = json.loads(text)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: cache format_version {version!r} is not {FORMAT_VERSION}; rebuild the cache")
        names = [f.name for f in CacheSettings.__dataclass_fields__.values()]
        settings = CacheSettings(**{k: data[k] for k in names})
        if data.get("settings_hash") != settings.hash():
            raise ValueError(f"{where}: settings_hash does not match the recorded settings (edited by hand?)")
        shards = {name: ShardRecord(**rec) for name, rec in data.get("shards", {}).items()}
        return cls(settings=settings, shards=shards, class_names=data.get("class_names"),
                   created_at=data.get("created_at", ""))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def manifest_path(root: str) -> str:
    return join(root, MANIFEST_NAME)


def shard_path(root: str, name: str) -> str:
    return join(root, SHARDS_DIR, f"{name}.parquet")


def tmp_path(root: str, name: str, suffix: str = ".parquet") -> str:
    return join(root, TMP_DIR, f"{name}{suffix}")


def load_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    data = read_bytes(fs, manifest_path(root))
    return None if data is None else Manifest.from_json(data.decode(), to_uri(fs, manifest_path(root)))


def save_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    write_bytes_atomic(fs, manifest_path(root), manifest.to_json().encode())


def open_cache(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str, Manifest, list[str]]:
    """A committed cache: (filesystem, root path, manifest, scheme-less paths of its shards)."""
    fs, root = filesystem_for(uri, s3 or S3Options())
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise ValueError(f"{uri} holds no {MANIFEST_NAME}; run pipelines/cache_teacher.py with output.path={uri}")
    return fs, root, manifest, [shard_path(root, name) for name in sorted(manifest.shards)]


# --------------------------------------------------------------------- rows
# Parquet has no 8-bit type: int8 is widened to INT32 with sign extension, whose random
# high bytes compress badly (~1.3 bytes a value with zstd). The same bytes typed uint8 are
# zero-extended, and with BYTE_STREAM_SPLIT + zstd take ~0.93 bytes a value.
TOKENS_PARQUET_ENCODING = {"tokens.list.element": "BYTE_STREAM_SPLIT"}


def token_value_type(token_dtype: str) -> pa.DataType:
    """float16, or uint8 holding the int8 tokens' two's-complement bytes (view back as int8)."""
    return pa.float16() if token_dtype == "float16" else pa.uint8()


def cache_schema(settings: CacheSettings) -> pa.Schema:
    value_type = token_value_type(settings.token_dtype)
    tokens = pa.field("tokens", pa.fixed_shape_tensor(value_type, tuple(settings.token_shape)), nullable=False)
    meta = {b"uta_cache_settings_hash": settings.hash().encode()}
    return pa.schema(VIEW_FIELDS + [tokens], metadata=meta)


def quantize_int8(tokens_BTD: torch.Tensor) -> torch.Tensor:
    """Per token, scale the largest |component| to 127 and round.

    The loss is a cosine, so each token's scale need not be stored. Absmax scaling uses
    the whole int8 range: scaling the L2-normalised token by 127 instead leaves components
    near 127/sqrt(D) (about 4 for D = 1024), i.e. a few bits, and a ~10x worse cosine.
    """
    x_BTD = tokens_BTD.float()
    scale_BT1 = INT8_SCALE / x_BTD.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.round(x_BTD * scale_BT1).clamp_(-127, 127).to(torch.int8)


def dequantize_int8(q_BTD: torch.Tensor) -> torch.Tensor:
    """int8 tokens -> unit-norm float tokens (the direction is all the cosine loss needs)."""
    return torch.nn.functional.normalize(q_BTD.float(), dim=-1)


def tokens_to_storage(tokens_BTD: torch.Tensor, token_dtype: str) -> np.ndarray:
    """float tokens -> what the ``tokens`` column holds: float16, or int8 bytes as uint8."""
    if token_dtype == "int8":
        return quantize_int8(tokens_BTD).cpu().numpy().view(np.uint8)
    if token_dtype == "float16":
        return tokens_BTD.float().cpu().numpy().astype(np.float16)
    raise ValueError(f"token_dtype must be one of {list(TOKEN_DTYPES)}, got {token_dtype!r}")


def tokens_from_storage(stored_BTD: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The ``tokens`` column (float16, or uint8 = int8 bytes) -> float32; int8 as unit vectors."""
    if not isinstance(stored_BTD, torch.Tensor):
        stored_BTD = np.asarray(stored_BTD)
        # Arrow hands out read-only views; torch wants writable memory.
        stored_BTD = torch.from_numpy(stored_BTD if stored_BTD.flags.writeable else stored_BTD.copy())
    if stored_BTD.dtype == torch.uint8:
        stored_BTD = stored_BTD.view(torch.int8)
    return dequantize_int8(stored_BTD) if stored_BTD.dtype == torch.int8 else stored_BTD.float()


def tokens_array(stored_BTD: np.ndarray) -> pa.FixedShapeTensorArray:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(stored_BTD))


def encode_view(pixels_HW3: np.ndarray, pixel_format: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if pixel_format == "png":  # lossless: tokens were computed on exactly these pixels
        Image.fromarray(pixels_HW3).save(buf, format="PNG", compress_level=1)
    elif pixel_format == "jpeg":  # the actor decodes the JPEG before the teacher sees it
        Image.fromarray(pixels_HW3).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"pixel_format must be one of {list(PIXEL_FORMATS)}, got {pixel_format!r}")
    return buf.getvalue()


def decode_pixels(encoded: list[bytes]) -> np.ndarray:
    """Encoded views -> uint8 (B, H, W, 3)."""
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.uint8) for b in encoded])


def read_cache_rows(batch: pa.Table | Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of cache rows (pyarrow table, or Ray's numpy dict) -> (pixels uint8 (B, H, W, 3),
    tokens float32 (B, 1+N, D)). Normalise pixels with ``uta_core.data.views.to_model_input``."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        encoded = batch.column("pixels").to_pylist()
        column = batch.column("tokens")
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        stored_BTD = column.to_numpy_ndarray()
    else:
        encoded, stored_BTD = list(batch["pixels"]), np.asarray(batch["tokens"])
    if stored_BTD.ndim != 3:
        raise ValueError(f"tokens must be (B, 1+N, D), got shape {stored_BTD.shape}; is this a cache shard?")
    return torch.from_numpy(decode_pixels(encoded)), tokens_from_storage(stored_BTD)

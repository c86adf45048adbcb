"""The teacher-feature cache on disk (docs/CACHE_FORMAT.md): manifest, row schema, stored views.

Written by ``pipelines/cache_teacher.py`` (``uta_core.cache.writer``); read by pre-training
and sweeps through ``open_cache`` (manifest + part files) and ``uta_core.cache.reader``.
A shard's rows live in one or more part files, written by the job's write tasks; the
manifest lists a shard's parts once all of them are written, so a reader never sees a
partial shard. Tokens are one fixed-size byte string per view in the cache's codec
(``uta_core.cache.codecs``).

Shape legend: B rows (views), T = 1+N tokens (CLS first), D embed dim, H/W pixels, S stored bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from uta_core.cache.codecs import BASIS_FILE, TOKEN_CODECS, LowRankBasis, TokenCodec
from uta_core.config import flatten
from uta_core.data.storage import S3Options, filesystem_for, join, read_bytes, to_uri, write_bytes_atomic

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
TMP_DIR = "_tmp"
PIXEL_FORMATS = ("jpeg", "png", "none")  # none: no pixels, views rebuilt from the source shards
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
    token_codec: str  # float16 | int8 | lowrank_int8 (uta_core.cache.codecs)
    token_rank: int | None  # lowrank_int8: the basis rank r (None otherwise)
    pixel_format: str
    views: dict[str, Any]  # num_views, size, scale, ratio, hflip, seed (+ jpeg_quality for jpeg)
    source_columns: dict[str, Any] | None = None  # pixel_format none: the input's image_column, key_column

    def __post_init__(self) -> None:
        if self.token_codec not in TOKEN_CODECS:
            raise ValueError(f"token_codec must be one of {list(TOKEN_CODECS)}, got {self.token_codec!r}")
        if (self.token_codec == "lowrank_int8") != (self.token_rank is not None):
            raise ValueError("token_rank is set for the lowrank_int8 codec and only for it")
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
class PartRecord:
    """One parquet file of a shard, written by one write task."""

    file: str  # path relative to the cache root: shards/<name>/<first row>-<last row>-<id>.parquet
    rows: int
    bytes: int
    sha256: str
    xxh3_128: str | None = None  # checked as training reads the part (caches written before it: sha256)


@dataclass(kw_only=True)
class ShardRecord:
    source: str  # input shard URI
    rows: int  # views written
    images: int  # images decoded
    skipped: int  # samples skipped (undecodable, truncated, no image, duplicate key)
    errors: list[str] = field(default_factory=list)  # first few skip reasons / container errors
    input_shard: dict[str, Any] | None = None  # the input shard (uri, path, format, label, root): views rebuild from it
    parts: list[PartRecord] = field(default_factory=list)  # in row order; empty for a shard without images
    committed_at: str = ""
    compute: str = ""  # e.g. "cuda bf16", "cpu fp32" (informational)
    read_error: str | None = None  # set: the input broke part-way, only the rows before it are here (redone on rerun)

    def __post_init__(self) -> None:
        self.parts = [p if isinstance(p, PartRecord) else PartRecord(**p) for p in self.parts]

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)


@dataclass(kw_only=True)
class Manifest:
    settings: CacheSettings
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    class_names: list[str] | None = None
    token_basis: dict[str, Any] | None = None  # lowrank_int8: file, sha256, rank, views, patch_cosine_mean/min
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: now())

    @property
    def settings_hash(self) -> str:
        return self.settings.hash()

    def files(self) -> list[tuple[str, int]]:
        """(path relative to the root, rows) of every committed part, shards in name order."""
        return [(p.file, p.rows) for name in sorted(self.shards) for p in self.shards[name].parts]

    def to_json(self) -> str:
        data = {"format_version": self.format_version, **self.settings.as_dict(),
                "settings_hash": self.settings_hash, "class_names": self.class_names,
                "token_basis": self.token_basis, "created_at": self.created_at,
                "shards": {name: asdict(rec) for name, rec in sorted(self.shards.items())}}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        """A manifest read back; an empty, torn or foreign file is one ``ManifestError`` naming it and the fix."""
        try:
            data = json.loads(text)
        except ValueError as err:
            what = "empty" if not text.strip() else f"not JSON ({getattr(err, 'msg', err)}, line {err.lineno})" \
                if hasattr(err, "lineno") else "not JSON"
            raise ManifestError(f"{where} is {what}: a save was cut off or the file was damaged; {_MANIFEST_FIX}") \
                from None
        if not isinstance(data, dict):
            raise ManifestError(f"{where} holds no JSON object: it is not a cache manifest; {_MANIFEST_FIX}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{where}: cache format_version {version!r} is not {FORMAT_VERSION}; rebuild the cache "
                                "with pipelines/cache_teacher.py into a new output.path")
        try:
            return cls._from_data(data, where)
        except (KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{where} is not a manifest this version reads ({_field_problem(err)}); "
                                f"{_MANIFEST_FIX}") from None

    @classmethod
    def _from_data(cls, data: dict[str, Any], where: str) -> Manifest:
        names = [f.name for f in CacheSettings.__dataclass_fields__.values()]
        settings = CacheSettings(**{k: data[k] for k in names if k in data})
        if data.get("settings_hash") != settings.hash():
            raise ManifestError(f"{where}: settings_hash does not match the recorded settings (edited by hand?)")
        shards = {}
        for name, rec in data.get("shards", {}).items():
            try:
                shards[name] = ShardRecord(**rec)
            except TypeError as err:
                raise TypeError(f"shard {name}: {_field_problem(err)}") from None
        return cls(settings=settings, shards=shards, class_names=data.get("class_names"),
                   token_basis=data.get("token_basis"), created_at=data.get("created_at", ""))


class ManifestError(ValueError):
    """A manifest that cannot be read as this version's."""


_MANIFEST_FIX = ("restore it from a copy, or cache into a new output.path (its committed parts are unusable without "
                 "their manifest)")


def _field_problem(err: BaseException) -> str:
    """``ShardRecord.__init__() missing 1 required keyword-only argument: 'rows'`` -> ``missing field 'rows'``."""
    text = str(err)
    if text.startswith("shard "):  # already described, with the shard it is in
        return text
    missing = re.findall(r"'(\w+)'", text) if "missing" in text else []
    if missing:
        return f"missing field {', '.join(repr(m) for m in missing)}"
    if isinstance(err, KeyError):
        return f"missing field {text}"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
    return f"unknown field {unexpected.group(1)!r}" if unexpected else text.split(": ", 1)[-1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def manifest_path(root: str) -> str:
    return join(root, MANIFEST_NAME)


def shard_dir(name: str) -> str:
    """A shard's folder of part files, relative to the cache root."""
    return f"{SHARDS_DIR}/{name}"


def tmp_path(root: str, name: str, suffix: str = ".parquet") -> str:
    return join(root, TMP_DIR, f"{name}{suffix}")


def load_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    data = read_bytes(fs, manifest_path(root))
    return None if data is None else Manifest.from_json(data.decode(), to_uri(fs, manifest_path(root)))


def save_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    write_bytes_atomic(fs, manifest_path(root), manifest.to_json().encode())


def open_cache(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str, Manifest, list[str]]:
    """A committed cache: (filesystem, root path, manifest, scheme-less paths of its part files)."""
    fs, root = filesystem_for(uri, s3 or S3Options())
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise ValueError(f"{uri} holds no {MANIFEST_NAME}; run pipelines/cache_teacher.py with output.path={uri}")
    return fs, root, manifest, [join(root, file) for file, _ in manifest.files()]


def open_codec(uri: str, s3: S3Options | None = None) -> TokenCodec:
    """The token codec of the cache at ``uri`` (what a trainer needs to restore its tokens)."""
    fs, root, manifest, _ = open_cache(uri, s3)
    return load_codec(fs, root, manifest)


def load_codec(fs: pafs.FileSystem, root: str, manifest: Manifest) -> TokenCodec:
    """The cache's token codec, with its basis (read from the cache) for lowrank_int8."""
    s, basis = manifest.settings, None
    if s.token_codec == "lowrank_int8":
        record = manifest.token_basis
        data = read_bytes(fs, join(root, record["file"])) if record else None
        if data is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"{to_uri(fs, root)}: the token basis {BASIS_FILE} is missing or differs from the one "
                             "its rows were encoded with; the cache cannot be decoded, rebuild it")
        basis = LowRankBasis.from_bytes(data)
    return TokenCodec(name=s.token_codec, token_shape=tuple(s.token_shape), basis=basis)


# --------------------------------------------------------------------- rows
def cache_schema(settings: CacheSettings, bytes_per_view: int) -> pa.Schema:
    """View columns + ``tokens``: one fixed-size byte string per view (flat, read without a copy)."""
    tokens = pa.field("tokens", pa.binary(bytes_per_view), nullable=False)
    meta = {b"uta_cache_settings_hash": settings.hash().encode()}
    return pa.schema(VIEW_FIELDS + [tokens], metadata=meta)


def tokens_array(stored_BS: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(B, S) uint8 -> a fixed_size_binary(S) array sharing its memory."""
    stored_BS = np.ascontiguousarray(stored_BS, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(stored_BS.shape[1]), stored_BS.shape[0],
                                                [None, pa.py_buffer(stored_BS)])


def byte_rows(column: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
    """A fixed-size byte column (``tokens``; Arrow, or Ray's numpy batch of bytes) -> (B, S) uint8;
    zero-copy from Arrow."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.FixedSizeBinaryArray):
        width = column.type.byte_width
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        return data[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)
    column = np.asarray(column)
    if column.dtype == np.uint8 and column.ndim == 2:
        return column
    return np.frombuffer(b"".join(column), dtype=np.uint8).reshape(len(column), -1)


def encode_view(pixels_HW3: np.ndarray, pixel_format: str, jpeg_quality: int = 95) -> bytes:
    """A view -> JPEG (default; the teacher sees the decoded JPEG) or lossless PNG bytes."""
    from torchvision.io import encode_jpeg, encode_png

    hw3 = np.ascontiguousarray(pixels_HW3)
    chw = torch.from_numpy(hw3 if hw3.flags.writeable else hw3.copy()).permute(2, 0, 1).contiguous()
    if pixel_format == "jpeg":
        return encode_jpeg(chw, quality=jpeg_quality).numpy().tobytes()
    if pixel_format == "png":
        return encode_png(chw, compression_level=1).numpy().tobytes()
    raise ValueError(f"pixel_format must be one of {list(PIXEL_FORMATS)}, got {pixel_format!r}")


def store_view(pixels_HW3: np.ndarray, pixel_format: str, jpeg_quality: int = 95) -> tuple[bytes, np.ndarray]:
    """A view -> (its stored bytes, the pixels every reader gets from them): what the teacher must see.
    ``none`` stores no bytes: readers rebuild the view from the source (``uta_core.data.rows``)."""
    if pixel_format == "none":
        return b"", pixels_HW3
    encoded = encode_view(pixels_HW3, pixel_format, jpeg_quality)
    return encoded, pixels_HW3 if pixel_format == "png" else decode_pixels([encoded])[0]


def decode_pixels(encoded: list[bytes] | np.ndarray) -> np.ndarray:
    """Encoded views -> uint8 (B, H, W, 3). One decoder (libjpeg-turbo / libpng in torchvision) for the
    teacher and the trainer, so both see the same pixels of a JPEG view. Each view is decoded and
    copied once into the batch (a stack + permute would copy it twice: 40% of the time)."""
    from torchvision.io import ImageReadMode, decode_image

    out_BHW3 = None
    for i, data in enumerate(encoded):
        view_3HW = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if out_BHW3 is None:
            out_BHW3 = torch.empty((len(encoded), *view_3HW.shape[1:], 3), dtype=torch.uint8)
        if view_3HW.shape[1:] != out_BHW3.shape[1:3]:
            raise ValueError(f"view {i} is {tuple(view_3HW.shape[1:])} px, the batch's first "
                             f"{tuple(out_BHW3.shape[1:3])}")
        out_BHW3[i].copy_(view_3HW.permute(1, 2, 0))
    return np.zeros((0, 0, 0, 3), np.uint8) if out_BHW3 is None else out_BHW3.numpy()

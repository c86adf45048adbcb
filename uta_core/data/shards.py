"""Input shards: WebDataset tars (as img2dataset writes them), image folders, parquet.

A *shard* is the unit of work and of output: one tar, one parquet file, or one class
sub-folder of an image folder. ``discover`` turns ``InputConfig`` into shards (failing
fast on missing paths); ``iter_samples`` streams one shard's samples through a pyarrow
FileSystem, so the same code reads local disk and S3. Samples carry raw image bytes;
decoding (and skipping what does not decode) is the caller's business.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uta_core.config import SettingError
from uta_core.data.storage import S3Options, StorageError, expand, list_dir, to_uri
from uta_core.data.views import IMAGE_EXTENSIONS

FORMATS = ("webdataset", "folder", "parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# WebDataset's rule: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(kw_only=True)
class InputConfig:
    paths: list[str] | str = field(default_factory=list)  # paths, globs or s3:// URIs
    format: Literal["auto", "webdataset", "folder", "parquet"] = "auto"
    image_column: str = "image"  # parquet: binary, or a struct with a 'bytes' field (HF datasets)
    key_column: str | None = None  # parquet: None = the row index within the file
    label_column: str | None = None
    caption_column: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths or not all(self.paths):
            raise SettingError("paths", "{key} is empty: pass {key}=<path, glob, [list] or s3://bucket/prefix> "
                                        "(e.g. {key}='data/shards/*.tar')")


@dataclass(frozen=True, kw_only=True)
class InputShard:
    uri: str  # as users see it (s3://... or an absolute local path)
    path: str  # scheme-less path for the filesystem
    format: str
    label: int | None = None  # folder shards: the class index of the whole folder
    root: str | None = None  # folder shards: the image-folder root (keys are relative to it)


@dataclass(kw_only=True)
class Sample:
    key: str
    image: bytes | None  # None: the sample has no image member/value
    label: int | None = None
    caption: str | None = None


@dataclass(kw_only=True)
class InputSet:
    fs: pafs.FileSystem
    format: str
    shards: list[InputShard]
    class_names: list[str] | None = None


class ShardReadError(RuntimeError):
    """The container itself is broken (e.g. a truncated tar); samples read so far stay valid."""


# --------------------------------------------------------------------- discovery
def discover(cfg: InputConfig, s3: S3Options, key: str = "input.paths") -> InputSet:
    """Resolve ``cfg.paths`` into shards; missing paths/buckets raise ``StorageError`` naming ``key``."""
    fs, infos = expand(cfg.paths, s3, key)
    fmt = cfg.format if cfg.format != "auto" else _detect_format(fs, infos, s3)
    if fmt == "folder":
        return _discover_folders(fs, infos, s3)
    suffixes = TAR_SUFFIXES if fmt == "webdataset" else PARQUET_SUFFIXES
    files = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            files += [i for i in list_dir(fs, info.path, recursive=True, s3=s3) if _has_suffix(i.path, suffixes)]
        elif _has_suffix(info.path, suffixes):
            files.append(info)
        else:
            raise StorageError(f"{to_uri(fs, info.path)} is not a {fmt} shard (expected {', '.join(suffixes)})")
    if not files:
        raise StorageError(f"no {fmt} shards ({', '.join(suffixes)}) found under {cfg.paths}")
    shards = [InputShard(uri=to_uri(fs, i.path), path=i.path, format=fmt) for i in files]
    if fmt == "parquet":
        _check_parquet_columns(fs, shards[0], cfg)
    return InputSet(fs=fs, format=fmt, shards=sorted(shards, key=lambda s: s.path))


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(suffixes))


def _detect_format(fs: pafs.FileSystem, infos: list[pafs.FileInfo], s3: S3Options) -> str:
    files = [i for i in infos if i.type == pafs.FileType.File]
    for info in infos:
        if info.type == pafs.FileType.Directory:
            files += [i for i in list_dir(fs, info.path, recursive=True, s3=s3) if i.type == pafs.FileType.File]
    if any(_has_suffix(i.path, TAR_SUFFIXES) for i in files):
        return "webdataset"
    if any(_has_suffix(i.path, PARQUET_SUFFIXES) for i in files):
        return "parquet"
    if any(_has_suffix(i.path, tuple("." + e for e in IMAGE_EXTENSIONS)) for i in files):
        return "folder"
    raise StorageError(
        "cannot tell the input format (no .tar, .parquet or image files found); set input.format"
    )


def _discover_folders(fs: pafs.FileSystem, infos: list[pafs.FileInfo], s3: S3Options) -> InputSet:
    """Each root's class sub-folders become shards; labels index the sorted union of class names."""
    roots = [i.path for i in infos if i.type == pafs.FileType.Directory]
    if len(roots) != len(infos):
        raise StorageError("input.format=folder needs folders (an image-folder root with class sub-folders)")
    per_root = {root: [i for i in list_dir(fs, root, recursive=False, s3=s3) if i.type == pafs.FileType.Directory]
                for root in roots}
    class_names = sorted({os.path.basename(d.path) for dirs in per_root.values() for d in dirs})
    shards = []
    for root, dirs in per_root.items():
        if not dirs:  # a flat folder of images: one unlabelled shard
            shards.append(InputShard(uri=to_uri(fs, root), path=root, format="folder", root=root))
        for d in dirs:
            label = class_names.index(os.path.basename(d.path))
            shards.append(InputShard(uri=to_uri(fs, d.path), path=d.path, format="folder", label=label, root=root))
    return InputSet(fs=fs, format="folder", shards=shards, class_names=class_names or None)


def _check_parquet_columns(fs: pafs.FileSystem, shard: InputShard, cfg: InputConfig) -> None:
    with fs.open_input_file(shard.path) as f:
        names = set(pq.ParquetFile(f).schema_arrow.names)
    for option in ("image_column", "key_column", "label_column", "caption_column"):
        column = getattr(cfg, option)
        if column is not None and column not in names:
            raise ValueError(
                f"input.{option}={column!r} is not a column of {shard.uri} (columns: {sorted(names)})"
            )


# --------------------------------------------------------------------- naming
def shard_names(uris: Sequence[str], committed: Mapping[str, str] | None = None) -> list[str]:
    """Deterministic output names: the base name without extension, plus a hash of the full URI
    when it collides with another input of this run or with a shard committed from another source.
    """
    committed = committed or {}
    stems = [_stem(uri) for uri in uris]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = []
    for uri, stem in zip(uris, stems):
        clash = counts[stem] > 1 or committed.get(stem, uri) != uri
        names.append(f"{stem}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}" if clash else stem)
    return names


def _stem(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return _NAME_CHARS.sub("_", base) or "shard"


# --------------------------------------------------------------------- reading
def iter_samples(fs: pafs.FileSystem, shard: InputShard, cfg: InputConfig) -> Iterator[Sample]:
    """Stream the samples of one shard. Raises ``ShardReadError`` if the container breaks."""
    if shard.format == "webdataset":
        return _iter_tar(fs, shard)
    if shard.format == "folder":
        return _iter_folder(fs, shard)
    if shard.format == "parquet":
        return _iter_parquet(fs, shard, cfg)
    raise ValueError(f"unknown shard format {shard.format!r}; use one of {FORMATS}")


def split_key(member: str) -> tuple[str, str] | None:
    """WebDataset member name -> (key, lower-case extension), None for names without one."""
    match = _KEY_EXT.match(member)
    return (match.group(1), match.group(2).lower()) if match else None


def _iter_tar(fs: pafs.FileSystem, shard: InputShard) -> Iterator[Sample]:
    # open_input_stream decompresses .gz by extension; "r|*" also copes with a plain stream.
    with fs.open_input_stream(shard.path) as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")
            key, parts = None, {}
            for member in tar:
                split = split_key(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:  # img2dataset writes a sample's members together
                    if key is not None:
                        yield _tar_sample(key, parts)
                    key, parts = split[0], {}
                parts[split[1]] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error) as err:  # content; I/O errors propagate
            raise ShardReadError(f"{shard.uri} is not a readable tar (truncated or corrupt?): {err}") from None
        if key is not None:
            yield _tar_sample(key, parts)


def _tar_sample(key: str, parts: dict[str, bytes]) -> Sample:
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    label = caption = None
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            label = None
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", errors="replace")
    return Sample(key=key, image=image, label=label, caption=caption)


def folder_image_files(fs: pafs.FileSystem, shard: InputShard) -> Iterator[pafs.FileInfo]:
    """The image files of a folder shard, as listed (no file is opened)."""
    recursive = shard.label is not None  # a flat root holds class folders' siblings: top level only
    exts = tuple("." + e for e in IMAGE_EXTENSIONS)
    for info in list_dir(fs, shard.path, recursive=recursive):
        if info.type == pafs.FileType.File and info.path.lower().endswith(exts):
            yield info


def _iter_folder(fs: pafs.FileSystem, shard: InputShard) -> Iterator[Sample]:
    for info in folder_image_files(fs, shard):
        rel = info.path[len(shard.root or shard.path):].lstrip("/")
        with fs.open_input_stream(info.path) as f:
            image = f.read()
        yield Sample(key=os.path.splitext(rel)[0], image=image, label=shard.label)


def _iter_parquet(fs: pafs.FileSystem, shard: InputShard, cfg: InputConfig) -> Iterator[Sample]:
    columns = [c for c in (cfg.image_column, cfg.key_column, cfg.label_column, cfg.caption_column) if c]
    row = 0
    try:
        with fs.open_input_file(shard.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
                images = _image_bytes(batch.column(cfg.image_column))
                keys = batch.column(cfg.key_column).to_pylist() if cfg.key_column else None
                labels = batch.column(cfg.label_column).to_pylist() if cfg.label_column else None
                captions = batch.column(cfg.caption_column).to_pylist() if cfg.caption_column else None
                for i, image in enumerate(images):
                    yield Sample(
                        key=str(keys[i]) if keys else f"{row:09d}",
                        image=image,
                        label=None if labels is None or labels[i] is None else int(labels[i]),
                        caption=None if captions is None else captions[i],
                    )
                    row += 1
    except pa.ArrowInvalid as err:  # content; I/O errors propagate (the shard is retried on rerun)
        raise ShardReadError(f"{shard.uri} is not a readable parquet file: {err}") from None


def _image_bytes(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):  # HF datasets' Image feature: {bytes, path}
        column = column.field("bytes")
    return column.to_pylist()

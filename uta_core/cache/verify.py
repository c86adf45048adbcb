"""Trusting nothing read back from a cache: part sizes before training, each part's sha256 as it is read.

A cache lives for months on S3 and is shared by every trial of a sweep; bit rot, a partial copy or
an interrupted ``aws s3 sync`` are ordinary events. The manifest records each part's size and
sha256 (``PartRecord``), so:
- before the workers start, one listing of ``shards/`` checks every listed part is there with its
  size (``check_part_sizes``; metadata only, no byte read);
- a reader hashes each part's bytes as it reads them (``read_part``: the loader reads whole parts
  anyway; xxh3-128, or sha256 for caches written before parts had one) and parses only bytes that
  match.
Either failure is a ``DamagedCacheError``: one line naming the cache, the shard, the part and the
fix (the cache job's rerun redoes a shard whose parts do not match, ``docs/CACHE_FORMAT.md``).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.fs as pafs
import xxhash

from uta_core.cache.format import SHARDS_DIR
from uta_core.data.storage import S3Options, file_sizes, filesystem_for, join
from uta_core.errors import RunCannotContinue

RERUN = ("rerun the cache job on the same output.path (python pipelines/cache_teacher.py with the cache's config): "
         "it redoes the shards whose parts do not match")


class DamagedCacheError(RunCannotContinue):
    """A cache part that is missing, of another size or of other bytes than its manifest records."""


def damaged(uri: str, shard: str, file: str, what: str) -> DamagedCacheError:
    return DamagedCacheError(f"cache {uri}: shard {shard}, part {file}: {what}; {RERUN}")


def part_sizes(fs: pafs.FileSystem, root: str, s3: S3Options | None = None) -> tuple[dict[str, int], list[str]]:
    """(path -> size of every file under ``<root>/shards``, the symbolic links there): one listing, metadata
    only. A link is never followed, so nothing outside the cache is ever listed (or deleted as a stray)."""
    return file_sizes(fs, join(root, SHARDS_DIR), s3)


def check_part_sizes(fs: pafs.FileSystem, root: str, uri: str, shards: dict, s3: S3Options | None = None) -> None:
    """Every part the manifest's ``shards`` list is in one listing of ``<root>/shards`` with its size."""
    sizes, _ = part_sizes(fs, root, s3)
    for name in sorted(shards):
        for part in shards[name].parts:
            found = sizes.get(join(root, part.file))
            if found is None:
                raise damaged(uri, name, part.file, "missing")
            if found != part.bytes:
                raise damaged(uri, name, part.file, f"{found:,} bytes, the manifest records {part.bytes:,}")


def read_part(fs: pafs.FileSystem, path: str, size: int | None, where: str, *, xxh3_128: str | None = None,
              sha256: str | None = None) -> pa.Buffer:
    """A part's bytes, after checking their length and digest against the manifest: its xxh3-128 when
    the manifest has one (~6 GB/s on a core), else its sha256 (~1 GB/s). ``where`` names the part in the
    error: ``cache <uri>: shard <name>, part <file>``."""
    try:
        with fs.open_input_file(path) as f:
            data = f.read_buffer()  # Arrow's buffer: hashed and parsed where it lies, no copy into Python
    except FileNotFoundError:
        raise DamagedCacheError(f"{where}: missing; {RERUN}") from None
    if size is not None and len(data) != size:
        raise DamagedCacheError(f"{where}: {len(data):,} bytes, the manifest records {size:,}; {RERUN}")
    if xxh3_128 is not None:
        name, ok = "xxh3-128", xxhash.xxh3_128_hexdigest(data) == xxh3_128
    else:
        name, ok = "sha256", sha256 is None or hashlib.sha256(data).hexdigest() == sha256
    if not ok:
        raise DamagedCacheError(f"{where}: its bytes differ from the {name} the manifest records (damaged in "
                                f"storage or in a copy); {RERUN}")
    return data


def mismatched_parts(uri: str, parts: list[tuple[str, str]], s3: S3Options | None = None) -> list[str]:
    """The paths among ``parts`` ((path, sha256) on ``uri``'s filesystem) whose bytes hash otherwise
    (or that cannot be read): the cache job's ``output.verify``, read in 8 MB pieces."""
    fs, _ = filesystem_for(uri, s3)
    bad = []
    for path, sha256 in parts:
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(path) as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
        except OSError:
            bad.append(path)
            continue
        if digest.hexdigest() != sha256:
            bad.append(path)
    return bad

"""The caching job's own writes to its output (driver side): each checked against the lease first.

Write tasks put part files under ``shards/`` (new names only: they never replace anything, and a part
counts only once the manifest lists it). Every other change to a cache folder is the driver's and goes
through ``CacheOutput``: the manifest, the token basis, deletions of parts no manifest lists, the
``_tmp/`` folder. Before each, ``check`` asks the lease (``uta_core.lease``): a job that lost the output
to another job stops there with one line and writes nothing more. The manifest is also replaced only
if it is still the version this job last wrote or read (a conditional PUT on S3, so the store itself
refuses a deposed owner's save once the new owner has saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.fs as pafs

from uta_core.cache.format import MANIFEST_NAME, TMP_DIR, Manifest, manifest_path
from uta_core.data.storage import (
    S3Options,
    delete_files,
    join,
    remove_atomic_leftovers,
    remove_dir,
    to_uri,
    write_bytes_atomic,
)
from uta_core.data.versioned import file_version, replace_if_unchanged
from uta_core.lease import Fence, Lease


@dataclass(kw_only=True)
class CacheOutput:
    fs: pafs.FileSystem
    root: str  # scheme-less
    s3: S3Options
    lease: Lease | None = None  # None: nobody else writes here (a test's folder, a reader)
    manifest_version: str | None = field(default=None, repr=False)  # as this job last read or wrote it

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.root)

    @property
    def fence(self) -> Fence | None:
        """The lease's check for the write tasks (they run in other processes)."""
        return self.lease.fence if self.lease is not None else None

    def check(self, writing: str) -> None:
        """Before a write: still the owner (``LeaseLost``, one line naming the new owner, otherwise)."""
        if self.lease is not None:
            self.lease.check(writing)

    def stop_if_lost(self) -> None:
        """What the lease's heartbeat already learnt, without asking the storage (every batch of parts)."""
        if self.lease is not None and self.lease.lost:
            self.lease.check("anything more")

    def note_manifest(self) -> None:
        """Remember the manifest's version as it is now (after reading it)."""
        self.manifest_version = file_version(self.fs, manifest_path(self.root), self.s3)

    def save_manifest(self, manifest: Manifest) -> None:
        self.check(MANIFEST_NAME)
        remove_atomic_leftovers(self.fs, manifest_path(self.root))  # of a run killed while saving it
        self.manifest_version = replace_if_unchanged(self.fs, manifest_path(self.root), manifest.to_json().encode(),
                                                     self.manifest_version, self.s3)

    def write(self, name: str, data: bytes) -> None:
        self.check(name)
        write_bytes_atomic(self.fs, join(self.root, name), data)

    def delete(self, paths: list[str], what: str) -> None:
        """Delete files (scheme-less paths under the root) that no manifest record lists."""
        if not paths:
            return
        self.check(what)
        outside = [p for p in paths if not p.startswith(self.root.rstrip("/") + "/")]
        if outside:
            raise RuntimeError(f"refusing to delete {outside[0]}: it is outside the cache {self.uri}")
        delete_files(self.fs, paths, self.s3)

    def clear_tmp(self) -> None:
        self.check(f"{TMP_DIR}/")
        remove_dir(self.fs, join(self.root, TMP_DIR))

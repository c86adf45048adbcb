"""Where a lease's records live: ``<output>/_lease/<generation>.json`` on a local disk or S3, and
what this host knows of a record's process.

Records are created only if absent: ``link(2)`` of a whole temporary file on a local disk, a
conditional PUT (``If-None-Match: *``) on S3. On S3 each operation is one request of its own
(boto3): small objects, no folder markers, no multipart uploads.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs

from uta_core.data.storage import (
    S3Options,
    boto3_client,
    filesystem_for,
    join,
    write_beside,
    write_bytes_atomic,
)
from uta_core.data.versioned import is_missing_key

LEASE_DIR = "_lease"
_RECORD = re.compile(r"(\d{12})\.json")
HOST = socket.gethostname()


def _machine() -> str:
    """This kernel's boot and pid namespace: two containers that share a hostname are not one host for pids."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: Path(p).read_text().strip()),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            return ""  # not Linux: no pid is trusted across jobs, staleness decides
    return "/".join(parts)


MACHINE = _machine()


class LeaseStore:
    """The lease folder on a local disk or S3: list, read, create-only, replace, delete. On S3 each is one
    request of its own (boto3): small objects, no folder markers, no multipart uploads."""

    def __init__(self, uri: str, s3: S3Options) -> None:
        self.uri, self.s3 = uri, s3
        self.fs, root = filesystem_for(uri, s3)
        self.dir = join(root, LEASE_DIR)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, generation: int) -> str:
        return join(self.dir, f"{generation:012d}.json")

    def _key(self, generation: int) -> tuple[str, str]:
        bucket, _, key = self.path(generation).partition("/")
        return bucket, key

    def generations(self) -> list[int]:
        if self.local:
            names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        else:
            bucket, _, prefix = self.dir.partition("/")
            pages = boto3_client(self.s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            names = [o["Key"].rsplit("/", 1)[-1] for page in pages for o in page.get("Contents", [])]
        return sorted(int(m.group(1)) for m in map(_RECORD.fullmatch, names) if m)

    def read(self, generation: int) -> bytes | None:
        """The record's bytes; None when it is gone. A transient failure is retried (a store under load)."""
        for attempt in range(4):
            try:
                if self.local:
                    with open(self.path(generation), "rb") as f:
                        return f.read()
                bucket, key = self._key(generation)
                return boto3_client(self.s3).get_object(Bucket=bucket, Key=key)["Body"].read()
            except FileNotFoundError:
                return None
            except Exception as err:
                if is_missing_key(err):
                    return None
                if attempt == 3:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        return None

    def create(self, generation: int, payload: bytes) -> bool:
        """Write the record only if no record of that generation exists; False if one does."""
        if not self.local:
            return _put_if_absent(self.s3, self.path(generation), payload)
        path = self.path(generation)
        tmp = write_beside(path, payload)
        try:
            os.link(tmp, path)  # atomic and create-only: the record appears whole, or not at all
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace(self, generation: int, payload: bytes) -> None:
        if self.local:
            write_bytes_atomic(self.fs, self.path(generation), payload)
        else:
            bucket, key = self._key(generation)
            boto3_client(self.s3).put_object(Bucket=bucket, Key=key, Body=payload)

    def delete(self, generation: int) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(generation))
        else:
            bucket, key = self._key(generation)
            boto3_client(self.s3).delete_object(Bucket=bucket, Key=key)


def process_state(pid: int) -> str:
    """``gone``, ``stopped`` (SIGSTOP, a debugger) or ``running``: a process of this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state, "running")


def _put_if_absent(s3: S3Options, path: str, payload: bytes) -> bool:
    """An S3 conditional PUT: creates the object only if absent (``If-None-Match: *``)."""
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    try:
        boto3_client(s3).put_object(Bucket=bucket, Key=key, Body=payload, IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True

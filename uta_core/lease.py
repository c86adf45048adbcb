"""Owning an output: one job at a time writes a cache or a run folder.

A job that writes an output takes a lease on it first: ``<output>/_lease.json`` holding its owner
(a random id), host, pid, command, start time and a heartbeat it renews every ``beat_s`` seconds.
The file is created only if it does not exist: ``O_CREAT | O_EXCL`` on a local disk, a conditional
PUT (``If-None-Match: *``) on S3, which AWS S3 and S3-compatible servers honour, so two jobs
starting at once cannot both win. A second job on the same output refuses with one line naming
the owner; a lease whose heartbeat is older than ``stale_s`` (its owner died without releasing it)
is taken over with a warning, at once when the owner ran on this host and its process is gone.
The owner releases it when it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from uta_core.data.storage import (
    S3Options,
    boto3_client,
    check_bucket,
    filesystem_for,
    is_s3,
    join,
    read_bytes,
    translate_error,
    write_bytes_atomic,
)
from uta_core.errors import RunCannotContinue

log = logging.getLogger("uta.lease")
LEASE_FILE = "_lease.json"


class OutputInUse(RunCannotContinue):
    """Another live job holds the output's lease."""


@dataclass(kw_only=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    command: str
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        return (f"{self.command!r} on {self.host} (pid {self.pid}), started {_ago(now - self.started)}, "
                f"heartbeat {_ago(now - self.heartbeat)}")


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


class Lease:
    """``with Lease(uri, s3, what).held(): ...`` owns ``uri`` for the block (``what`` names the output
    in messages, e.g. ``"output.path"``)."""

    def __init__(self, uri: str, s3: S3Options | None, what: str, *, beat_s: float = 30.0,
                 stale_s: float = 180.0) -> None:
        self.uri, self.s3, self.what = uri, s3 or S3Options(), what
        self.beat_s, self.stale_s = beat_s, stale_s
        self.fs, self.root = filesystem_for(uri, self.s3)
        self.path = join(self.root, LEASE_FILE)
        now = time.time()
        self.record = LeaseRecord(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                                  command=" ".join(os.path.basename(a) for a in sys.argv[:2]) or "python",
                                  started=now, heartbeat=now)
        self._stop = threading.Event()
        self._made: list[str] = []  # local folders the lease created
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        for _ in range(3):  # a takeover races at most a few times
            if self._create():
                self._start_heartbeat()
                return
            current = self._read()
            now = time.time()
            if current is None:
                continue  # released (or unreadable and just replaced) meanwhile: try again
            if now - current.heartbeat <= self.stale_s and not _dead_here(current):
                raise OutputInUse(
                    f"{self.what} {self.uri} is in use by another job: {current.describe(now)}; wait for it to "
                    f"end or stop it, or use another {self.what} (a lease idle for {self.stale_s:g} s is taken "
                    f"over; delete {join(self.uri, LEASE_FILE)} only if that job is surely dead)")
            log.warning("%s %s: taking over the lease of a job that stopped renewing it: %s", self.what, self.uri,
                        current.describe(now))
            self._delete()
        raise OutputInUse(f"{self.what} {self.uri}: could not take its lease (another job keeps taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.owner == self.record.owner:
            self._delete()
        for folder in self._made:  # deepest first; only if the job left them empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    # ----------------------------------------------------------------- storage
    def _payload(self) -> bytes:
        return json.dumps(asdict(self.record), indent=1).encode()

    def _create(self) -> bool:
        """Write the lease if none exists; False if one does."""
        if is_s3(self.uri):
            check_bucket(self.fs, self.root, self.s3)  # the bucket's own one-line errors first
            try:
                return _put_if_absent(self.uri, self.s3, self._payload())
            except Exception as err:  # no bucket, no credentials, no endpoint: one line, as for any S3 access
                raise translate_error(err, self.uri, self.s3) from None
        folder = os.path.dirname(self.path)
        while folder and not os.path.isdir(folder):  # what we create, we remove again if the job writes nothing
            self._made.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
        return True

    def _read(self) -> LeaseRecord | None:
        try:
            data = read_bytes(self.fs, self.path)
            return LeaseRecord(**json.loads(data)) if data else None
        except (ValueError, TypeError):  # torn or foreign: treat as stale
            return LeaseRecord(owner="?", host="?", pid=0, command="?", started=0.0, heartbeat=0.0)

    def _delete(self) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self.path)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="uta-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            current = self._read()
            if current is None or current.owner != self.record.owner:
                log.error("%s %s: lost its lease to %s", self.what, self.uri,
                          current.describe(time.time()) if current else "nobody (deleted)")
                return
            self.record.heartbeat = time.time()
            with contextlib.suppress(OSError):
                write_bytes_atomic(self.fs, self.path, self._payload())


def _dead_here(record: LeaseRecord) -> bool:
    """The owner ran on this host and its process is gone (killed): no need to wait for the heartbeat."""
    if record.host != socket.gethostname() or record.pid <= 0:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _put_if_absent(uri: str, s3: S3Options, payload: bytes) -> bool:
    """An S3 conditional PUT: creates the object only if absent (``If-None-Match: *``)."""
    from botocore.exceptions import ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    key = f"{key.rstrip('/')}/{LEASE_FILE}" if key else LEASE_FILE
    client = boto3_client(s3)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=payload, IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


"""Owning an output: one job at a time writes a cache or a run folder, and a deposed owner writes nothing.

A job that writes an output takes its lease first. The lease is a folder of records,
``<output>/_lease/<generation>.json``, one per owner, each created only if absent
(``uta_core/lease_store.py``). The owner is the highest generation, so when two jobs take over the
same stale lease at once, exactly one of them creates the next generation; the other refuses. The
record holds the owner's random id (the fencing token), host, machine, pid, command and a heartbeat
counter its owner rewrites every ``beat_s``.

- **Fenced writes.** Before every commit (a manifest, a checkpoint, an export, a deletion, the
  end of its MLflow run) a writer calls ``check``: the highest generation must still be its own,
  with its own id. A job that finds it lost raises ``LeaseLost`` naming the new owner and writes
  nothing more. Workers on other machines get the same check as a ``Fence``.
- **Staleness on one clock.** A lease is taken over when its record has not changed for
  ``stale_s`` seconds on the taker's own clock (never by comparing two hosts' clocks); at once
  when its owner ran on this host (same boot, same pid namespace) and its process is gone. A live
  owner on this host refuses at once; elsewhere, a heartbeat seen while waiting refuses.
- **The heartbeat survives transient errors** (it retries with backoff) and stops only when it
  knows the lease was lost.
- Records of other versions of this code (a field more or less) are read for what they hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

from uta_core.data.storage import S3Options, StorageError, check_bucket, is_s3, translate_error
from uta_core.errors import RunCannotContinue
from uta_core.lease_store import HOST, LEASE_DIR, MACHINE, LeaseStore, process_state

__all__ = ["LEASE_DIR", "Fence", "Lease", "LeaseConfig", "LeaseLost", "LeaseRecord", "OutputInUse"]
log = logging.getLogger("uta.lease")


@dataclass(kw_only=True)
class LeaseConfig:
    """How a job holds the lease on its output."""

    beat_s: float = 30.0  # seconds between the owner's heartbeats
    stale_s: float = 180.0  # a lease whose record is unchanged this long (on the taker's clock) is taken over

    def __post_init__(self) -> None:
        if not 0 < self.beat_s < self.stale_s:
            raise ValueError(f"beat_s={self.beat_s:g} must be positive and below stale_s={self.stale_s:g}: an "
                             "owner renews its lease several times before another job may take it over")


class OutputInUse(RunCannotContinue):
    """Another live job holds the output's lease."""


class LeaseLost(RunCannotContinue):
    """This job's lease was taken over: it must not write to the output any more."""


@dataclass(kw_only=True)
class LeaseRecord:
    generation: int
    owner: str  # a random id: the fencing token
    host: str = "?"
    machine: str = ""  # boot id and pid namespace: whose pids ``pid`` is one of
    pid: int = 0
    command: str = "?"
    started: str = ""  # the owner's clock, for people only
    beat: int = 0  # the heartbeat counter: a record that changes is alive
    beat_s: float = 30.0

    @classmethod
    def parse(cls, data: bytes | None) -> LeaseRecord | None:
        """A record of any version of this code (fields it lacks take defaults, unknown ones are ignored);
        None when it is not one (torn, foreign)."""
        try:
            raw = json.loads(data) if data else None
            known = {f.name for f in fields(cls)}
            record = cls(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError, AttributeError):
            return None
        ok = isinstance(record.generation, int) and isinstance(record.owner, str) and record.owner
        return record if ok else None

    def describe(self) -> str:
        return f"{self.command!r} on {self.host} (pid {self.pid}), started {self.started or '?'}"


@dataclass(frozen=True, kw_only=True)
class Fence:
    """A picklable check of one owner's lease, for the processes that write on its behalf (training workers)."""

    uri: str
    s3: S3Options
    what: str
    generation: int
    owner: str

    def check(self, writing: str) -> None:
        """Raise ``LeaseLost`` (one line, naming the new owner) unless this owner still holds the lease."""
        lost = self.lost_to()
        if lost is not None:
            raise LeaseLost(self.lost_message(lost, writing))

    def lost_to(self) -> LeaseRecord | None:
        """The record that now holds the lease when it is not ours; None while it is ours."""
        store = LeaseStore(self.uri, self.s3)
        top = store.generations()
        if top and top[-1] == self.generation:
            mine = LeaseRecord.parse(store.read(self.generation))
            if mine is not None and mine.owner == self.owner:
                return None
            return mine or LeaseRecord(generation=self.generation, owner="?")
        if top:
            return LeaseRecord.parse(store.read(top[-1])) or LeaseRecord(generation=top[-1], owner="?")
        return LeaseRecord(generation=0, owner="", command="another job (which has since released it)")

    def lost_message(self, lost: LeaseRecord, writing: str) -> str:
        holder = lost.describe() if lost.owner else lost.command
        return (f"{self.what} {self.uri}: this job lost its lease (generation {self.generation}) to {holder}; it "
                f"stops without writing {writing} or anything else (the new owner carries on)")


class Lease:
    """``with Lease(uri, s3, what).held(): ...`` owns ``uri`` for the block (``what`` names the output in
    messages, e.g. ``"output.path"``); ``check(writing)`` before every commit."""

    def __init__(self, uri: str, s3: S3Options | None, what: str, cfg: LeaseConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        cfg = cfg or LeaseConfig()
        self.uri, self.s3, self.what = uri, s3 or S3Options(), what
        self.beat_s, self.stale_s, self.clock = cfg.beat_s, cfg.stale_s, clock
        self.store = LeaseStore(uri, self.s3)
        self.record = LeaseRecord(generation=0, owner=uuid.uuid4().hex, host=HOST, machine=MACHINE,
                                  pid=os.getpid(),
                                  command=" ".join(os.path.basename(a) for a in sys.argv[:2]) or "python",
                                  started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), beat_s=cfg.beat_s)
        self._stop = threading.Event()
        self._lost: LeaseRecord | None = None
        self._made: list[str] = []  # local folders the lease created, removed again if left empty
        self._thread: threading.Thread | None = None

    @property
    def fence(self) -> Fence:
        return Fence(uri=self.uri, s3=self.s3, what=self.what, generation=self.record.generation,
                     owner=self.record.owner)

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        self.acquire()
        try:
            yield self
        except BaseException:
            self.release(quiet=True)  # the error that stopped the job is the one to see
            raise
        self.release()

    # ----------------------------------------------------------------- taking it
    def acquire(self) -> None:
        try:
            if is_s3(self.uri):
                check_bucket(self.store.fs, self.store.dir, self.s3)
            self._note_made_folders()
            for _ in range(8):  # each round either wins, refuses, or saw the lease change hands
                if self._try_acquire():
                    self._start_heartbeat()
                    return
        except (RunCannotContinue, StorageError):
            raise
        except Exception as err:  # no bucket, no credentials, no endpoint: one line, as for any storage access
            raise translate_error(err, self.uri, self.s3) from None
        raise OutputInUse(f"{self.what} {self.uri}: could not take its lease (other jobs keep taking it)")

    def _try_acquire(self) -> bool:
        generations = self.store.generations()
        top = generations[-1] if generations else 0
        if top and not self._outlived(top):
            return False  # released or replaced while we looked: look again
        self.record.generation = top + 1
        if not self.store.create(top + 1, self._payload()):
            raise OutputInUse(self._in_use(LeaseRecord.parse(self.store.read(top + 1)), "took its lease just now"))
        if self.fence.lost_to() is not None:  # a store that let two creates through: the last writer holds it
            raise OutputInUse(self._in_use(LeaseRecord.parse(self.store.read(top + 1)), "took its lease just now"))
        for old in generations:  # the records this one supersedes
            self.store.delete(old)
        return True

    def _outlived(self, generation: int) -> bool:
        """True once the holder of ``generation`` may be taken over (dead, or silent for ``stale_s``);
        False if its record changed meanwhile (look again); raises ``OutputInUse`` while it lives."""
        data = self.store.read(generation)
        if data is None:
            return False
        record = LeaseRecord.parse(data)
        if record is not None and MACHINE and record.machine == MACHINE and record.pid > 0:
            state = process_state(record.pid)
            if state == "gone":
                log.warning("%s %s: taking over the lease of a job whose process is gone: %s", self.what, self.uri,
                            record.describe())
                return True
            if state == "running":
                raise OutputInUse(self._in_use(record, "is running on this host"))
        holder = record.describe() if record else "an unreadable lease record"
        log.warning("%s %s: its lease is held by %s; waiting up to %g s for its heartbeat before taking it over",
                    self.what, self.uri, holder, self.stale_s)
        since, poll = self.clock(), min(1.0, self.stale_s / 20)
        while self.clock() - since < self.stale_s:
            time.sleep(poll)
            now = self.store.read(generation)
            if now != data:
                if now is None:
                    return False
                raise OutputInUse(self._in_use(LeaseRecord.parse(now), "renewed its lease just now"))
        log.warning("%s %s: taking over the lease of %s: unchanged for %g s", self.what, self.uri, holder,
                    self.stale_s)
        return True

    def _in_use(self, record: LeaseRecord | None, seen: str) -> str:
        holder = record.describe() if record else "another job"
        return (f"{self.what} {self.uri} is in use by another job: {holder} {seen}; wait for it to end or stop it, "
                f"or use another {self.what} (a lease unchanged for {self.stale_s:g} s is taken over)")

    def _note_made_folders(self) -> None:
        if is_s3(self.uri):
            return
        folder = self.store.dir
        while folder and not os.path.isdir(folder):
            self._made.append(folder)
            folder = os.path.dirname(folder)

    # ----------------------------------------------------------------- holding it
    def check(self, writing: str) -> None:
        """The fence: raise ``LeaseLost`` unless this job still holds the lease (before every commit)."""
        if self._lost is None:
            self._lost = self.fence.lost_to()
        if self._lost is not None:
            raise LeaseLost(self.fence.lost_message(self._lost, writing))

    @property
    def lost(self) -> bool:
        """What the heartbeat learnt (no storage access)."""
        return self._lost is not None

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.record), indent=1).encode()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="uta-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        delay, failures = self.beat_s, 0
        while not self._stop.wait(delay):
            try:
                lost = self.fence.lost_to()
                if lost is not None:
                    self._lost = lost
                    log.error("%s", self.fence.lost_message(lost, "its next commit"))
                    return
                self.record.beat += 1
                self.store.replace(self.record.generation, self._payload())
                delay, failures = self.beat_s, 0
            except Exception as err:  # storage away for a moment: retry soon, the lease is not lost for it
                failures += 1
                delay = min(self.beat_s, 0.25 * 2 ** failures)
                if failures == 1:
                    log.warning("%s %s: could not renew its lease (%s); retrying", self.what, self.uri,
                                str(err).splitlines()[0] if str(err) else type(err).__name__)

    # ----------------------------------------------------------------- giving it back
    def release(self, quiet: bool = False) -> None:
        """Delete this job's record if it still holds the lease. ``quiet``: a failure is logged, not raised
        (the job is failing already; its own error is the one to see)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.record.generation and self._lost is None and self.fence.lost_to() is None:
                self.store.delete(self.record.generation)
        except Exception as err:
            if not quiet:
                raise translate_error(err, self.uri, self.s3) from None
            log.warning("%s %s: could not release its lease (%s)", self.what, self.uri,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
        for folder in self._made:  # deepest first; only if the job left them empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)

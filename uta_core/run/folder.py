"""A training run's folder, ``<run.storage_path>/<run.name>``: the only code that knows its files.

The layout (docs/RUN_FORMAT.md):

    _lease/<generation>.json            the owner of the folder (uta_core.lease)
    config.yaml                         the resolved config and the plan, as the run started
    mlflow_run.json                     the run's MLflow run: {run_id, tracking_uri}
    checkpoint_<step>/state.pt          the training state (uta_core.checkpoint)
    checkpoint_<step>/checkpoint.json   its record: sizes and sha256, written last
    checkpoint_manager_snapshot.json    Ray Train's list of the checkpoints (Ray's file)
    samples/rank<r>-epoch<e>-from<step>.txt   run.record_samples: the ids each rank trained on
    teacher_stream.json                 stream mode: the teacher's setup a resumed run reuses
    teacher_stream_basis.safetensors    stream mode, lowrank_int8: its token basis
    export/                             the trained model (uta_core.models.export, open_clip_export)

A ``RunFolder`` made with a ``Fence`` (``owned``) checks the lease before every write: a job that
lost the folder to another job stops before its next write, with one line naming the new owner.
Readers of a checkpoint get its state verified (``uta_core.checkpoint.read_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from uta_core.checkpoint import DamagedCheckpoint, read_checkpoint, write_checkpoint
from uta_core.data.storage import (
    S3Options,
    filesystem_for,
    is_s3,
    join,
    list_dir,
    read_bytes,
    remove_dir,
    write_bytes_atomic,
)
from uta_core.lease import Fence, Lease, LeaseConfig

log = logging.getLogger("uta.run")

CONFIG_FILE = "config.yaml"
MLFLOW_RUN_FILE = "mlflow_run.json"
EXPORT_DIR = "export"
SAMPLES_DIR = "samples"
STREAM_SETUP_FILE = "teacher_stream.json"
STREAM_BASIS_FILE = "teacher_stream_basis.safetensors"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{7})")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def is_checkpoint_dir(name: str) -> bool:
    return _CHECKPOINT_DIR.fullmatch(name) is not None


@dataclass(frozen=True)
class RunFolder:
    """``<storage>/<name>`` on a local disk or S3. Picklable: workers get the same object (and its fence)."""

    uri: str
    s3: S3Options
    fence: Fence | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.uri, self.s3)[0]

    @property
    def root(self) -> str:
        return filesystem_for(self.uri, self.s3)[1]

    def path(self, *names: str) -> str:
        """A file of the folder, scheme-less (what the filesystem takes)."""
        return join(self.root, *names)

    def uri_of(self, *names: str) -> str:
        return join(self.uri, *names)

    # ----------------------------------------------------------------- ownership
    @contextlib.contextmanager
    def owned(self, cfg: LeaseConfig) -> Iterator[RunFolder]:
        """Hold the folder's lease for the block; the folder it yields checks the lease before every write."""
        lease = Lease(self.uri, self.s3, "run", cfg)
        with lease.held():
            yield RunFolder(self.uri, self.s3, lease.fence)

    def guard(self, writing: str) -> None:
        """Before a write: still the owner (``LeaseLost`` otherwise). Folders made without a fence (a
        test's ranks, a reader) write unchecked."""
        if self.fence is not None:
            self.fence.check(writing)

    def _write(self, name: str, data: bytes, writing: str) -> None:
        self.guard(writing)
        write_bytes_atomic(self.fs, self.path(name), data)

    # ----------------------------------------------------------------- config, MLflow
    def save_config(self, text: str) -> None:
        self._write(CONFIG_FILE, text.encode(), CONFIG_FILE)

    def save_mlflow_record(self, run_id: str, tracking_uri: str) -> None:
        record = {"run_id": run_id, "tracking_uri": tracking_uri}
        self._write(MLFLOW_RUN_FILE, json.dumps(record).encode(), MLFLOW_RUN_FILE)

    def mlflow_record(self) -> dict[str, str] | None:
        """The MLflow run an earlier attempt opened; None when there is none or it is unreadable."""
        data = read_bytes(self.fs, self.path(MLFLOW_RUN_FILE))
        try:
            record = json.loads(data) if data else None
            return {"run_id": str(record["run_id"]), "tracking_uri": str(record["tracking_uri"])} if record else None
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; its MLflow run is left as it is", self.uri_of(MLFLOW_RUN_FILE))
            return None

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_uri(self, step: int) -> str:
        return self.uri_of(checkpoint_dir_name(step))

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoint folders, newest first (complete or not: ``load_checkpoint`` tells)."""
        infos = list_dir(self.fs, self.root, recursive=False, s3=self.s3)
        return sorted((int(m.group(1)) for m in (_CHECKPOINT_DIR.fullmatch(i.base_name) for i in infos)
                       if m and self.fs.get_file_info(join(self.root, m.group(0))).type == pafs.FileType.Directory),
                      reverse=True)

    def load_checkpoint(self, step: int) -> dict[str, Any]:
        """The verified state of ``checkpoint_<step>`` (``DamagedCheckpoint``, ``UnsafeCheckpoint``)."""
        return read_checkpoint(self.fs, self.path(checkpoint_dir_name(step)))

    def newest_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest complete checkpoint; each damaged or incomplete one newer than it is
        skipped with one line. A file that would run code stops the search (``UnsafeCheckpoint``)."""
        for step in self.checkpoint_steps():
            try:
                return step, self.load_checkpoint(step)
            except DamagedCheckpoint as err:
                log.warning("%s; resuming from an older checkpoint", err)
        return None

    def newest_complete_step(self) -> int | None:
        found = self.newest_checkpoint()
        return found[0] if found else None

    def save_checkpoint(self, state: dict[str, Any], step: int, keep: int) -> None:
        """Write ``checkpoint_<step>`` (the record last), then keep the newest ``keep`` checkpoints."""
        self.guard(checkpoint_dir_name(step))
        write_checkpoint(self.fs, self.path(checkpoint_dir_name(step)), state, step)
        for old in self.checkpoint_steps()[keep:]:
            self.guard(f"the removal of {checkpoint_dir_name(old)}")
            remove_dir(self.fs, self.path(checkpoint_dir_name(old)))

    def stage_checkpoint(self, state: dict[str, Any], step: int, folder: str | Path) -> None:
        """The files of ``checkpoint_<step>`` in a local folder, for Ray Train to upload into this one."""
        self.guard(checkpoint_dir_name(step))
        write_checkpoint(pafs.LocalFileSystem(), str(Path(folder).resolve()), state, step)

    # ----------------------------------------------------------------- samples, stream setup
    def record_samples(self, rank: int, epoch: int, from_step: int, ids: list[int]) -> None:
        name = f"rank{rank}-epoch{epoch:04d}-from{from_step:07d}.txt"
        self._write(join(SAMPLES_DIR, name), "\n".join(map(str, ids)).encode(), f"{SAMPLES_DIR}/{name}")

    def save_stream_setup(self, meta: dict[str, Any], basis: bytes | None) -> None:
        if basis is not None:
            self._write(STREAM_BASIS_FILE, basis, STREAM_BASIS_FILE)
        self._write(STREAM_SETUP_FILE, json.dumps(meta, indent=1).encode(), STREAM_SETUP_FILE)

    def stream_setup(self) -> tuple[dict[str, Any], bytes | None] | None:
        """(meta, basis bytes) of the streamed teacher's setup an earlier start stored; None if none."""
        text = read_bytes(self.fs, self.path(STREAM_SETUP_FILE))
        if text is None:
            return None
        try:
            meta = json.loads(text)
        except ValueError:
            raise ValueError(f"{self.uri_of(STREAM_SETUP_FILE)} is not JSON: restore it from a copy or start a new "
                             "run (another run.name)") from None
        return meta, read_bytes(self.fs, self.path(STREAM_BASIS_FILE))

    # ----------------------------------------------------------------- export
    @property
    def export_uri(self) -> str:
        return self.uri_of(EXPORT_DIR)

    def has_export(self) -> bool:
        return self.fs.get_file_info(self.path(EXPORT_DIR)).type == pafs.FileType.Directory

    def write_export(self, folder: str | Path) -> str | None:
        """The files of a local export folder into ``export/`` (each whole); returns where it is when that is on
        this machine (its open_clip config must then name its new place), else None."""
        self.guard(EXPORT_DIR)
        for name in sorted(os.listdir(folder)):
            write_bytes_atomic(self.fs, self.path(EXPORT_DIR, name), (Path(folder) / name).read_bytes())
        return None if is_s3(self.uri) else self.path(EXPORT_DIR)

    # ----------------------------------------------------------------- Ray Train's file
    def set_aside_damaged_ray_snapshot(self) -> None:
        """Ray Train cannot start a run whose checkpoint snapshot is empty or torn (a full disk while it wrote
        it): move it aside, so Ray Train starts afresh and the loop resumes from the newest complete
        checkpoint in the folder."""
        path = self.path(RAY_SNAPSHOT)
        data = read_bytes(self.fs, path)
        if data is None:
            return
        with contextlib.suppress(ValueError):
            json.loads(data)
            return
        self.guard(f"the move of {RAY_SNAPSHOT}")
        aside = f"{path}.damaged-{int(time.time())}"
        self.fs.move(path, aside)
        log.warning("%s: Ray Train's checkpoint snapshot was %s; moved it to %s, the run resumes from its newest "
                    "complete checkpoint", self.uri, "empty" if not data else "unreadable", aside)

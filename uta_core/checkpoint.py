"""The training state and the checkpoint folder that holds it, saved and read in one place.

A checkpoint folder (``<run>/checkpoint_<step>``, docs/RUN_FORMAT.md) holds two files:

    state.pt          the training state (below), torch.save'd: tensors and plain data only
    checkpoint.json   its record, written last: format, step, and every file's size and sha256

The state:

    model       state dict of what trains (a UTAStudent, or a CLIP in the contrastive stage)
    optimizer   AdamW state          scheduler   LambdaLR state
    position    Position: steps done, epoch, micro-batches consumed in it, every rank's cursor,
                the MLflow run id
    config      the job config, as a dict (``uta_core.config.to_dict``)
    plan        the run geometry the driver computed (steps, warm-up, accumulation)
    meta        what the job needs to use the model: input mean/std, the teacher (pre-training)

Nothing read back is trusted: ``read_checkpoint`` checks the record (a folder without one is
incomplete: an upload cut off), each file's size and sha256 (torch's zip reader checks no CRC, so a
flipped byte in a tensor would load), and loads with ``weights_only=True``, so a file that holds
anything but tensors and plain data is refused before any of it runs. Each failure is one line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from uta_core.data.storage import join, read_bytes, to_uri, write_bytes_atomic
from uta_core.errors import RunCannotContinue

STATE_FILE = "state.pt"
RECORD_FILE = "checkpoint.json"
RECORD_FORMAT = 1


class DamagedCheckpoint(RunCannotContinue):
    """A checkpoint that is incomplete, or whose bytes differ from its record."""


class UnsafeCheckpoint(RunCannotContinue):
    """A file that would run code when unpickled: never loaded."""


@dataclass(kw_only=True)
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches each rank consumed in ``epoch``
    cursors: list[dict] | None = None  # per rank: its place in the epoch's stream (uta_core.data.epochs.Cursor)
    mlflow_run_id: str | None = None
    resumed: bool = False


def training_state(model: nn.Module, optimizer, scheduler, position: Position, config: dict, plan: dict,
                   meta: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": dataclasses.asdict(position),
        "config": config,
        "plan": plan,
        "meta": meta,
    }


def restore(state: dict[str, Any], model: nn.Module, optimizer, scheduler) -> Position:
    """Load model, optimiser and scheduler in place; the position to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**{**state["position"], "resumed": True})


# --------------------------------------------------------------------- the folder's files
def checkpoint_files(state: dict[str, Any], step: int) -> dict[str, bytes]:
    """The folder's files in the order they are written: the state, then its record."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    record = {"format": RECORD_FORMAT, "step": step,
              "files": {STATE_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
              "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    return {STATE_FILE: data, RECORD_FILE: json.dumps(record, indent=1).encode()}


def write_checkpoint(fs: pafs.FileSystem, folder: str, state: dict[str, Any], step: int) -> None:
    """Each file whole (a temporary name and a rename, or one PUT), the record last: a folder with a
    record that matches its files is complete."""
    for name, data in checkpoint_files(state, step).items():
        write_bytes_atomic(fs, join(folder, name), data)


def save_state(state: dict[str, Any], folder: str | Path, step: int) -> None:
    """A checkpoint folder on the local disk (what Ray Train uploads)."""
    write_checkpoint(pafs.LocalFileSystem(), str(Path(folder).resolve()), state, step)


def read_checkpoint(fs: pafs.FileSystem, folder: str) -> dict[str, Any]:
    """The verified state of a checkpoint folder; ``DamagedCheckpoint`` or ``UnsafeCheckpoint`` (one line)."""
    where = to_uri(fs, folder)
    record = _record(fs, folder, where)
    entry = record["files"][STATE_FILE]
    data = read_bytes(fs, join(folder, STATE_FILE))
    if data is None:
        raise DamagedCheckpoint(f"checkpoint {where}: {STATE_FILE} is missing")
    if len(data) != entry["bytes"]:
        raise DamagedCheckpoint(f"checkpoint {where}: {STATE_FILE} holds {len(data):,} bytes, its {RECORD_FILE} "
                                f"records {entry['bytes']:,} (cut off in storage or in a copy)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DamagedCheckpoint(f"checkpoint {where}: the bytes of {STATE_FILE} differ from the sha256 its "
                                f"{RECORD_FILE} records (damaged in storage or in a copy)")
    return safe_load(data, f"{where}/{STATE_FILE}")


def load_state(folder: str | Path) -> dict[str, Any]:
    """The verified state of a local checkpoint folder."""
    return read_checkpoint(pafs.LocalFileSystem(), str(Path(folder).resolve()))


def _record(fs: pafs.FileSystem, folder: str, where: str) -> dict[str, Any]:
    data = read_bytes(fs, join(folder, RECORD_FILE))
    if data is None:
        raise DamagedCheckpoint(f"checkpoint {where} is incomplete: it has no {RECORD_FILE} (its upload or save was "
                                "cut off, or an older version wrote it)")
    try:
        record = json.loads(data)
        if record["format"] != RECORD_FORMAT or not isinstance(record["files"][STATE_FILE]["bytes"], int):
            raise ValueError(f"format {record['format']!r}")
        return record
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"checkpoint {where}: its {RECORD_FILE} is not a record this version reads "
                                f"({err}); it is not used") from None


def safe_load(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU: tensors and plain data, nothing that runs; a file
    that needs more is ``UnsafeCheckpoint``, one that is not a torch file ``DamagedCheckpoint``."""
    if not data.startswith(b"PK\x03\x04") and not data.startswith(b"\x80"):  # torch.save's zip, or its legacy pickle
        raise DamagedCheckpoint(f"{where} is not a torch weights file (neither torch.save's zip format nor its "
                                "legacy one); give a checkpoint or weights file")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _unsafe_globals(data)
        if not found:  # a torn or damaged pickle, not a foreign object
            raise DamagedCheckpoint(f"{where} is not a readable torch file ({_reason(err)})") from None
        raise UnsafeCheckpoint(
            f"{where} holds objects other than tensors and plain data ({found}): loading it could run code, so "
            "it was refused and nothing in it ran; use a checkpoint this project wrote, or delete the file") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # truncated zip, not a torch file
        raise DamagedCheckpoint(f"{where} is not a readable torch file ({_reason(err)})") from None


def _unsafe_globals(data: bytes) -> str:
    """What the file would import and call, for the message; empty when it cannot be listed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - a damaged file: no list
        return ""
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _reason(err: BaseException) -> str:
    """The cause in torch's message, without its preamble about ``weights_only``'s default."""
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error: (.+)", text)
    line = found.group(1) if found else (text.splitlines()[0] if text else type(err).__name__)
    return line.strip().split(". ")[0][:200]  # torch's advice after the first sentence is for torch's own bugs

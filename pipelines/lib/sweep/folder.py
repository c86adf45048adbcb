"""A sweep's folder, ``<--storage-path>/<--name>``: Ray Tune's experiment state, held by one sweep at a time.

Ray Tune restores a sweep (``Tuner.restore``) by unpickling the files it keeps there: a sweep folder
must be as trusted as code. This project's sweep writes ``_uta_sweep.json`` (its owner record) when it
creates the folder and restores only a folder whose record names the same sweep: a folder Tune or
someone else wrote is refused with one line, and nothing in it is loaded.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import socket

from uta_core.data.storage import S3Options, filesystem_for, join, read_bytes, write_bytes_atomic

OWNER_FILE = "_uta_sweep.json"
PROJECT = "uta-pipelines"


def sweep_owner(folder: str, s3: S3Options) -> dict | None:
    fs, root = filesystem_for(folder, s3)
    data = read_bytes(fs, join(root, OWNER_FILE))
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def claim_new_sweep(folder: str, name: str, s3: S3Options, parent_run_id: str | None = None) -> None:
    """Record this sweep as the folder's owner, with its MLflow parent run (a resumed sweep continues it)."""
    fs, root = filesystem_for(folder, s3)
    record = {"project": PROJECT, "sweep": name, "host": socket.gethostname(), "user": getpass.getuser(),
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "parent_run_id": parent_run_id}
    write_bytes_atomic(fs, join(root, OWNER_FILE), json.dumps(record, indent=1).encode())


def check_restorable(folder: str, name: str, s3: S3Options) -> None:
    """Before ``Tuner.restore``: the folder's owner record names this project's sweep ``name``."""
    owner = sweep_owner(folder, s3)
    if not owner or owner.get("project") != PROJECT or owner.get("sweep") != name:
        raise ValueError(
            f"{folder} holds a Ray Tune experiment that this project's sweep {name!r} did not create (no "
            f"{OWNER_FILE} naming it): resuming would unpickle its files, which can run code, so nothing in it was "
            "loaded; use another --name, or move that folder away if you do not know where it came from")

"""A run's data as MLflow datasets: what the UI's Datasets column and a registered model's lineage show.

A dataset is recorded by reference (``mlflow.log_input`` of a ``MetaDataset``): its source is the URI
the job read (a folder, a glob, ``s3://...``), its digest identifies exactly what was read (the
shards or cache parts the driver listed, with their row counts, or a cache manifest's settings), and
its tags say how much (shards, rows, where the counts came from). Nothing of the data is read for it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from typing import Any

TRAINING, EVALUATION, OUTPUT = "training", "evaluation", "output"


def digest_of(*parts: Any) -> str:
    """A short, stable digest of plain data (lists, dicts, strings, numbers; others by ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_dataset(name: str, uris: str | Sequence[str], digest: str, context: str, **tags: Any) -> None:
    """Record a dataset on the active MLflow run: ``uris`` (one, or the patterns the job was given; the
    first is the source), ``context`` (training, evaluation, output), ``tags`` (counts, origins)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uris = [uris] if isinstance(uris, str) else list(uris)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(_source_uri(uris[0]))
    dataset = MetaDataset(source=source, name=name, digest=digest)
    extra = {"uris": " ".join(uris)} if len(uris) > 1 else {}
    mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in {**extra, **tags}.items()})


def _source_uri(uri: str) -> str:
    """What MLflow's source registry resolves: a glob's folder (a pattern is no artefact location)."""
    head = uri.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    return head.rsplit("/", 1)[0] + "/" if head != uri else uri

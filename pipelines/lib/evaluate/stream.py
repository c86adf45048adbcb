"""Evaluation that scales: eval images decoded on Ray Data tasks (one per shard), encoded in batches on
an actor pool (a GPU each, or the CPUs), and only their embeddings brought back. The driver holds a
row of the embedding dim per image (float32) and its label or caption; no pixel reaches it, so its
memory does not grow with the image size and stays small in the image count (ImageNet val at
1024-d: 200 MB, against 7.5 GB of 224 px pixels).

Shape legend: B batch, D embedding dim.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from pipelines.lib.progress import DriverProgress
from uta_core.data.epochs import producer_counts
from uta_core.data.samples import decoded_samples
from uta_core.data.shards import InputConfig, InputShard, discover
from uta_core.data.storage import S3Options, filesystem_for
from uta_core.data.views import center_view

# A decode worker's own memory (the interpreter, the data path's imports): Ray Data measured up to
# 451 MiB unique per worker on digits, and warns unless a request holds 1.25x what it measures.
DECODE_BASE_BYTES = 640 << 20


@dataclass(frozen=True)
class EvalSet:
    """One set to embed: its images and what each row keeps (``label`` or ``caption``)."""

    input: InputConfig
    need: str


@dataclass(frozen=True)
class EvalViews:
    """What a decode task needs; small and picklable (no filesystem objects)."""

    sets: tuple[EvalSet, ...]
    s3: S3Options
    size: int
    rows: int  # views per block handed on: one encoder batch, so each actor call returns (and the bar moves) per batch


def _views_of_shards(batch: pa.Table, task: EvalViews) -> Iterator[dict[str, np.ndarray]]:
    for item in batch.to_pylist():
        shard, index = InputShard(**json.loads(item["shard"])), item["set"]
        wanted = task.sets[index]
        fs, _ = filesystem_for(shard.uri, task.s3)
        pixels, values = [], []
        for _, sample, img in decoded_samples(fs, shard, wanted.input, need=(wanted.need,)):
            pixels.append(center_view(img, task.size))
            values.append(str(getattr(sample, wanted.need)))  # one column type for labels and captions
            if len(pixels) == task.rows:
                yield _block(pixels, values, index)
                pixels, values = [], []
        if pixels:
            yield _block(pixels, values, index)


def _block(pixels: list[np.ndarray], values: list[str], index: int) -> dict[str, np.ndarray]:
    return {"pixels": np.stack(pixels), "value": np.asarray(values), "set": np.full(len(values), index)}


class StudentEncoder:
    """An actor's student (loaded once): pixels -> CLS embeddings in the joint space (float32). The
    model modules are imported here, in the actor, so that decode tasks import only the data path."""

    def __init__(self, model: str, s3: S3Options, device: str, threads: int) -> None:
        from uta_core.eval.evaluator import image_embeddings
        from uta_core.models.trained import load_trained_student

        torch.set_num_threads(threads)
        self.student, self.mean, self.std, _ = load_trained_student(model, s3)
        self.device, self.image_embeddings = device, image_embeddings
        self.student.to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels_BHW3 = torch.from_numpy(batch["pixels"])
        emb_BD = self.image_embeddings(self.student, pixels_BHW3, self.mean, self.std,
                                       batch_size=len(pixels_BHW3), device=self.device)
        return {"embedding": emb_BD.numpy(), "value": batch["value"], "set": batch["set"]}


def decode_memory(task: EvalViews) -> int:
    """Bytes a decode task reserves: its block of views twice (the views and their stack) plus the
    interpreter's working set. Declaring it also keeps Ray Data from fusing the decode step into
    the encoder actors (it fuses maps whose remote arguments are equal), where every shard would
    then be decoded serially inside an actor and its embeddings would come back only at its end."""
    return DECODE_BASE_BYTES + 2 * task.rows * task.size * task.size * 3


@dataclass(frozen=True)
class Encoder:
    """Where and how the actor pool encodes."""

    model: str
    device: str
    actors: int
    threads: int
    batch_size: int


def eval_dataset(sets: list[EvalSet], enc: Encoder, *, s3: S3Options, size: int,
                 max_images: int | None) -> tuple[ray.data.Dataset, int | None]:
    """Decode tasks (one per shard of every set; ``max_images`` a set) -> one encoder actor pool, and
    the number of images to expect when every shard's producer stats say it (else None)."""
    task = EvalViews(tuple(sets), s3, size, enc.batch_size)
    streams, totals = [], []
    for index, wanted in enumerate(sets):
        inputs = discover(wanted.input, s3)
        items = [{"shard": json.dumps(dataclasses.asdict(shard)), "set": index} for shard in inputs.shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _views_of_shards, fn_kwargs={"task": task}, batch_size=1, batch_format="pyarrow", num_cpus=1,
            memory=decode_memory(task))
        streams.append(ds.limit(max_images) if max_images is not None else ds)
        counts = producer_counts(inputs.fs, inputs.shards)
        totals.append(min(sum(counts), max_images or sys.maxsize) if counts is not None else max_images)
    ds = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
    ds = ds.map_batches(StudentEncoder, fn_constructor_args=(enc.model, s3, enc.device, enc.threads),
                        batch_size=enc.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=enc.actors),
                        num_cpus=1 if enc.device == "cpu" else 0.5, num_gpus=1 if enc.device == "cuda" else None)
    return ds, (sum(totals) if None not in totals else None)


def embed(sets: list[EvalSet], enc: Encoder, *, s3: S3Options, size: int, max_images: int | None,
          label: str) -> list[tuple[torch.Tensor, list]]:
    """Every usable image of each set (up to ``max_images`` a set, the first decoded) -> (embeddings
    (M, D) float32, labels or captions) per set, in no particular order. Decoding on Ray tasks (one
    per shard), encoding on ``enc.actors`` actors that serve every set (one start for all); a progress
    bar with the rate."""
    ds, total = eval_dataset(sets, enc, s3=s3, size=size, max_images=max_images)
    chunks: list[list[torch.Tensor]] = [[] for _ in sets]
    values: list[list[str]] = [[] for _ in sets]
    done, start = 0, time.perf_counter()
    with DriverProgress(label, total, unit="img", remote=False) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for index in np.unique(batch["set"]):
                rows = batch["set"] == index
                chunks[index].append(torch.from_numpy(batch["embedding"][rows]))
                values[index].extend(batch["value"][rows].tolist())
            done += len(batch["set"])
            bar.set(done, note=f"{done / (time.perf_counter() - start):.0f} img/s")
    out = []
    for wanted, emb, kept in zip(sets, chunks, values):
        if not kept:
            raise ValueError(f"eval input {wanted.input.paths} holds no usable image with a {wanted.need}")
        out.append((torch.cat(emb), [int(v) for v in kept] if wanted.need == "label" else kept))
    return out

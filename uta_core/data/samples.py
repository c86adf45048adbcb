"""The one loop over a shard's decoded images: what it skips, it counts and says why.

Every reader of images (the cache job's view tasks and basis fit, online training rows,
contrastive rows, evaluation sets) goes through ``decoded_samples``: a sample without an
image (or without the label or caption the caller needs), an image that does not decode,
or a repeated key is skipped and counted in ``SampleStats``; a container that breaks
part-way (a truncated tar) ends the shard with the samples read before the damage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow.fs as pafs
from PIL import Image

from uta_core.data.shards import InputConfig, InputShard, Sample, ShardReadError, iter_samples
from uta_core.data.views import ImageDecodeError, decode_image

__all__ = ["SampleStats", "decoded_samples"]
log = logging.getLogger("uta.data")
MAX_ERRORS = 10  # skip reasons kept per shard
NEEDS = ("label", "caption")


@dataclass(kw_only=True)
class SampleStats:
    """What one pass over a shard decoded and what it skipped."""

    source: str
    images: int = 0  # decoded and handed out
    skipped: int = 0  # no image (or no label / caption asked for), undecodable, duplicate key
    errors: list[str] = field(default_factory=list)  # the first few skip reasons / the container error
    read_error: str | None = None  # the container broke: only the samples before the damage were read

    def skip(self, key: str, reason: str) -> None:
        self.skipped += 1
        self.note(f"{key}: {reason}")

    def note(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message[:300])


def decoded_samples(
    fs: pafs.FileSystem, shard: InputShard, input_cfg: InputConfig, *, stats: SampleStats | None = None,
    need: Sequence[str] = (), unique_keys: bool = False, first: int = 0,
) -> Iterator[tuple[int, Sample, Image.Image]]:
    """(ordinal, sample, RGB image) of every usable sample of ``shard``, in shard order.

    ``ordinal`` counts every sample of the shard, usable or not, so it is a stable position;
    samples before ``first`` are passed over without decoding (a resumed epoch). ``need``:
    ``label`` and/or ``caption`` the caller cannot do without.
    """
    if unknown := set(need) - set(NEEDS):
        raise ValueError(f"need={sorted(unknown)}: a sample can only be required to have {NEEDS}")
    stats = stats if stats is not None else SampleStats(source=shard.uri)
    seen: set[str] = set()
    try:
        for ordinal, sample in enumerate(iter_samples(fs, shard, input_cfg)):
            if ordinal < first:
                continue
            reason = _unusable(sample, need, seen if unique_keys else None)
            if reason is None:
                try:
                    image = decode_image(sample.image)
                except ImageDecodeError as err:
                    reason = str(err)
            if reason is not None:
                stats.skip(sample.key, reason)
                continue
            stats.images += 1
            yield ordinal, sample, image
    except ShardReadError as err:
        stats.note(str(err))
        stats.read_error = str(err)[:300]
        log.warning("%s; keeping the %d samples read before it", err, stats.images)
    if stats.skipped:
        log.warning("%s: skipped %d samples, e.g. %s", shard.uri, stats.skipped, "; ".join(stats.errors[:3]))


def _unusable(sample: Sample, need: Sequence[str], seen: set[str] | None) -> str | None:
    if seen is not None:
        if sample.key in seen:
            return "duplicate key in the shard"
        seen.add(sample.key)
    if sample.image is None:
        return "the sample has no image"
    if "label" in need and sample.label is None:
        return "the sample has no label"
    if "caption" in need and not sample.caption:
        return "the sample has no caption"
    return None

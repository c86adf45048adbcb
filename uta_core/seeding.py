"""The one way this project derives a seed from names and numbers.

``stable_seed("mask", seed, rank, step, micro)`` is the first 8 bytes of the sha256 of the
parts joined by ``/``, as a 63-bit int: the same on every worker, process and rerun, and
independent of Python's hash randomisation and of the order work is done in. Views, masks,
row ids, caption ids, epoch orders, crops and shuffles all draw from it, so a resumed or
re-split run draws exactly what an uninterrupted one drew.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["stable_seed", "rng", "torch_generator"]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed of ``parts`` (str() of each, joined by ``/``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by ``stable_seed(*parts)``."""
    return np.random.default_rng(stable_seed(*parts))


def torch_generator(*parts: object) -> torch.Generator:
    """A CPU torch generator seeded by ``stable_seed(*parts)``."""
    return torch.Generator().manual_seed(stable_seed(*parts))

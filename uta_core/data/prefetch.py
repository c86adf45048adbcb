"""Host-side work for the next micro-batches on a background thread, while the device trains.

The training loop hands each micro-batch (numpy rows of its epoch stream) to ``prefetched`` with the
task's ``prepare`` (tensors, pinned memory on a GPU worker, the micro-batch's masks), so that
work runs ``depth`` micro-batches ahead instead of between two steps. Torch and numpy release
the GIL in their kernels, so the thread overlaps the loop's own Python (kernel launches).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["pin", "prefetched"]

T = TypeVar("T")
U = TypeVar("U")


def prefetched(items: Iterable[T], prepare: Callable[[T], U], depth: int = 2) -> Iterator[U]:
    """``prepare(item)`` for each item, in order, computed on one thread up to ``depth`` items ahead.

    ``depth=0`` prepares each item when it is asked for (no thread). An error in ``prepare``
    is raised where its item would have been yielded. Closing the iterator waits for the at
    most ``depth`` items in flight and reads no more of ``items``.
    """
    if depth < 0:
        raise ValueError(f"depth={depth} must be >= 0")
    if depth == 0:
        yield from map(prepare, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uta-prefetch") as pool:
        queue: deque[Future[U]] = deque()
        for item in items:
            queue.append(pool.submit(prepare, item))
            if len(queue) > depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory when the tensor will go to a GPU (its copy then runs asynchronously)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor

"""torch.distributed helpers the training steps share (no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a scalar over all ranks (an all-reduce: every rank must call it)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (world x B, D), with gradients flowing back to each rank's own rows."""
    if not is_distributed():
        return x_BD
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x_BD))

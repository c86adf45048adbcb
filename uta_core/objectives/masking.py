"""Patch masking strategies: which K of the N patches the student sees.

Every strategy returns the same number of kept patches K = round(N * (1 - mask_ratio)) for
every image, so a batch of kept tokens stacks into (B, K, D) without padding.

- ``random`` (FLIP): K uniformly random positions.
- ``block`` (BEiT / EVA-02 ``MaskingGenerator``): rectangles are masked until N - K patches are.
- ``block_reversed`` (UTA, Sec. 2.2 and Fig. 3): per image, with probability ``reverse_prob``
  the blocks mark the *kept* patches instead. Plain block masking hits the centre far more
  often than the border; the mixture of both is close to spatially uniform.
- ``gaussian`` (GLIP): keep score U(0, 1) + an isotropic 2-D Gaussian pdf over the grid in
  [-1, 1]^2; the top K scores are kept, so the centre is kept more often.

Shape legend: B batch, N patches (H*W grid, row-major), K kept patches, H/W grid rows/cols.
Kept indices are a LongTensor (B, K), sorted ascending in each row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


__all__ = ["STRATEGIES", "MaskConfig", "MaskGenerator", "keep_to_mask"]

STRATEGIES = ("random", "block", "block_reversed", "gaussian")

# BEiT tries this many rectangles before deciding a mask cannot grow any more.
_BEIT_ATTEMPTS = 10


@dataclass(kw_only=True)
class MaskConfig:
    """Masking strategy and its options; the grid comes from the model, not from here."""

    strategy: str = "block_reversed"
    mask_ratio: float = 0.5
    min_block_area: int = 16  # block strategies: smallest rectangle, in patches
    aspect_min: float = 0.3  # block strategies: aspect ratio drawn log-uniform in [a, 1/a]
    reverse_prob: float = 0.5  # block_reversed: chance that blocks mark the kept patches
    gaussian_variance: float = 0.2  # gaussian: variance (not sigma) of the keep bonus

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie strictly between 0 and 1")
        if isinstance(self.min_block_area, bool) or not isinstance(self.min_block_area, int) or self.min_block_area < 1:
            raise ValueError(f"min_block_area={self.min_block_area!r} must be a positive integer (patches)")
        if not 0.0 < self.aspect_min <= 1.0:
            raise ValueError(f"aspect_min={self.aspect_min} must lie in (0, 1]; the range is [aspect_min, 1/aspect_min]")
        if not 0.0 <= self.reverse_prob <= 1.0:
            raise ValueError(f"reverse_prob={self.reverse_prob} must lie in [0, 1]")
        if not self.gaussian_variance > 0.0:
            raise ValueError(f"gaussian_variance={self.gaussian_variance} must be positive")


class MaskGenerator:
    """Callable: ``gen(B, generator) -> keep_idx_BK`` for one grid and one strategy."""

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int]) -> None:
        self.cfg = cfg
        self.grid = _check_grid(grid)
        self.strategy = cfg.strategy
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_keep = round(self.num_patches * (1.0 - cfg.mask_ratio))
        self.num_masked = self.num_patches - self.num_keep
        self._check_counts()
        self._log_aspect = (math.log(cfg.aspect_min), -math.log(cfg.aspect_min))
        self._keep_bonus_N = _gaussian_pdf(self.grid, cfg.gaussian_variance).flatten()

    def _check_counts(self) -> None:
        N, r = self.num_patches, self.cfg.mask_ratio
        H, W = self.grid
        if self.num_keep == 0:
            raise ValueError(
                f"mask_ratio={r} keeps round({N}*(1-{r}))=0 of the {N} patches of the {H}x{W} grid; "
                f"use mask_ratio <= {1 - 1 / N:.4f} so at least one patch is kept"
            )
        if self.num_keep == N:
            raise ValueError(
                f"mask_ratio={r} masks none of the {N} patches of the {H}x{W} grid; "
                f"use mask_ratio >= {1 / N:.4f} so at least one patch is masked"
            )

    def __repr__(self) -> str:
        return f"MaskGenerator(grid={self.grid}, K={self.num_keep}/{self.num_patches}, {asdict(self.cfg)})"

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Kept patch indices (B, K), sorted ascending; all randomness from ``generator``."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if self.strategy == "random":
            score_BN = torch.rand(batch_size, self.num_patches, generator=generator)
            return _top_k_sorted(score_BN, self.num_keep)
        if self.strategy == "gaussian":
            score_BN = torch.rand(batch_size, self.num_patches, generator=generator) + self._keep_bonus_N
            return _top_k_sorted(score_BN, self.num_keep)
        return self._block_keep(batch_size, _numpy_rng(generator))

    def _block_keep(self, B: int, rng: np.random.Generator) -> torch.Tensor:
        reverse_prob = self.cfg.reverse_prob if self.strategy == "block_reversed" else 0.0
        keep_BN = np.empty((B, self.num_patches), dtype=bool)
        for b in range(B):
            if rng.random() < reverse_prob:
                keep_BN[b] = self._block_mask(rng, self.num_keep).ravel()  # blocks are the kept tokens
            else:
                keep_BN[b] = ~self._block_mask(rng, self.num_masked).ravel()
        # np.nonzero walks row-major, so each row's indices come out ascending.
        keep_idx = np.nonzero(keep_BN)[1].reshape(B, self.num_keep)
        return torch.from_numpy(keep_idx).long()

    def _block_mask(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """(H, W) bool with exactly ``count`` True: BEiT blocks, then a random top-up."""
        H, W = self.grid
        mask_HW = np.zeros((H, W), dtype=bool)
        done = 0
        while done < count:
            added = self._add_block(rng, mask_HW, count - done)
            if added == 0:
                break
            done += added
        return _fix_count(rng, mask_HW, count)

    def _add_block(self, rng: np.random.Generator, mask_HW: np.ndarray, budget: int) -> int:
        """One step of BEiT's ``MaskingGenerator._mask``: up to 10 tries for a rectangle."""
        H, W = self.grid
        lo = self.cfg.min_block_area
        for _ in range(_BEIT_ATTEMPTS):
            u_area, u_aspect, u_top, u_left = rng.random(4)
            # BEiT draws uniform(min_area, budget) even when budget < min_area (then <= min_area).
            area = lo + (budget - lo) * u_area
            aspect = math.exp(self._log_aspect[0] + (self._log_aspect[1] - self._log_aspect[0]) * u_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w >= W or h >= H:  # BEiT never lets one block span the whole grid
                continue
            top, left = int(u_top * (H - h + 1)), int(u_left * (W - w + 1))
            window = mask_HW[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            # Only place blocks that add something and do not overshoot the budget.
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in grid):
        raise ValueError(f"grid={grid!r} must be two positive ints (rows, cols) of patches")
    return (grid[0], grid[1])


def _top_k_sorted(score_BN: torch.Tensor, k: int) -> torch.Tensor:
    return score_BN.topk(k, dim=1).indices.sort(dim=1).values


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    # Seed numpy from the torch generator so one torch seed fixes every strategy's masks.
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


def _gaussian_pdf(grid: tuple[int, int], variance: float) -> torch.Tensor:
    """(H, W) isotropic 2-D normal pdf at patch centres mapped onto [-1, 1] (as GLIP)."""
    y_H, x_W = (torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in grid)
    r2_HW = y_H[:, None] ** 2 + x_W[None, :] ** 2
    return torch.exp(-r2_HW / (2 * variance)) / (2 * math.pi * variance)


def _fix_count(rng: np.random.Generator, mask_HW: np.ndarray, count: int) -> np.ndarray:
    """Set or clear random cells so exactly ``count`` are True (BEiT often falls short)."""
    flat = mask_HW.ravel()
    gap = count - int(flat.sum())
    if gap > 0:
        flat[rng.choice(np.flatnonzero(~flat), gap, replace=False)] = True
    elif gap < 0:
        flat[rng.choice(np.flatnonzero(flat), -gap, replace=False)] = False
    return mask_HW


def keep_to_mask(keep_idx_BK: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean (B, N) mask, True at masked (not kept) positions."""
    B = keep_idx_BK.shape[0]
    mask_BN = torch.ones(B, num_patches, dtype=torch.bool, device=keep_idx_BK.device)
    mask_BN.scatter_(1, keep_idx_BK, False)
    return mask_BN

"""Patch masking strategies: which K of the N patches the student sees.

Every strategy returns the same number of kept patches K = round(N * (1 - mask_ratio)) for
every image, so a batch of kept tokens stacks into (B, K, D) without padding. ``mask_ratio`` 0
keeps every patch whatever the strategy (the paper's Tab. 8 "0.0" row: alignment without masking).

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
from typing import Literal, get_args

import numpy as np
import torch

__all__ = ["STRATEGIES", "MaskConfig", "MaskGenerator", "keep_to_mask"]

Strategy = Literal["random", "block", "block_reversed", "gaussian"]
STRATEGIES = get_args(Strategy)

# BEiT tries this many rectangles before deciding a mask cannot grow any more.
_BEIT_ATTEMPTS = 10


@dataclass(kw_only=True)
class MaskConfig:
    """Masking strategy and its options; the grid comes from the model, not from here."""

    strategy: Strategy = "block_reversed"
    mask_ratio: float = 0.5
    min_block_area: int = 16  # block strategies: smallest rectangle, in patches
    aspect_min: float = 0.3  # block strategies: aspect ratio drawn log-uniform in [a, 1/a]
    reverse_prob: float = 0.5  # block_reversed: chance that blocks mark the kept patches
    gaussian_variance: float = 0.2  # gaussian: variance (not sigma) of the keep bonus

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in [0, 1) (0: no masking, every patch kept)")
        if isinstance(self.min_block_area, bool) or not isinstance(self.min_block_area, int) or self.min_block_area < 1:
            raise ValueError(f"min_block_area={self.min_block_area!r} must be a positive integer (patches)")
        if not 0.0 < self.aspect_min <= 1.0:
            raise ValueError(f"aspect_min={self.aspect_min} must lie in (0, 1]; "
                             "the range is [aspect_min, 1/aspect_min]")
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
        if self.num_keep == N and r > 0:
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
        if self.num_masked == 0:  # mask_ratio 0 (the paper's Tab. 8 baseline): every patch, any strategy
            return torch.arange(self.num_patches).expand(batch_size, -1).clone()
        if self.strategy == "random":
            score_BN = torch.rand(batch_size, self.num_patches, generator=generator)
            return _top_k_sorted(score_BN, self.num_keep)
        if self.strategy == "gaussian":
            score_BN = torch.rand(batch_size, self.num_patches, generator=generator) + self._keep_bonus_N
            return _top_k_sorted(score_BN, self.num_keep)
        return self._block_keep(batch_size, _numpy_rng(generator))

    def _block_keep(self, B: int, rng: np.random.Generator) -> torch.Tensor:
        reverse_prob = self.cfg.reverse_prob if self.strategy == "block_reversed" else 0.0
        reversed_B = rng.random(B) < reverse_prob  # these rows' blocks are the kept tokens
        count_B = np.where(reversed_B, self.num_keep, self.num_masked)
        blocks_BN = self._block_masks(rng, count_B).reshape(B, self.num_patches)
        keep_BN = blocks_BN ^ ~reversed_B[:, None]
        # np.nonzero walks row-major, so each row's indices come out ascending.
        keep_idx = np.nonzero(keep_BN)[1].reshape(B, self.num_keep)
        return torch.from_numpy(keep_idx).long()

    def _block_masks(self, rng: np.random.Generator, count_B: np.ndarray) -> np.ndarray:
        """(B, H, W) bool, row b with exactly ``count_B[b]`` True: BEiT blocks, then a random top-up.

        BEiT's ``MaskingGenerator`` run on every row at once: each round is one call of its
        ``_mask`` (up to 10 tries for a rectangle) for every row still growing; a row stops
        when it reaches its count or a round places nothing. Rows draw their own numbers, so
        each row follows BEiT's distribution; a round is a few array operations over the
        batch, not a Python loop over rows.
        """
        H, W = self.grid
        B = len(count_B)
        mask_BHW = np.zeros((B, H, W), dtype=bool)
        done_B = np.zeros(B, dtype=np.int64)
        growing_B = done_B < count_B
        ii_H, jj_W = np.arange(H)[:, None], np.arange(W)[None, :]
        while (rows := np.flatnonzero(growing_B)).size:
            top, left, h, w, new = self._first_block(rng, mask_BHW[rows], count_B[rows] - done_B[rows])
            placed = new > 0
            rows = rows[placed]
            t, l, b, r = (a[placed, None, None] for a in (top, left, top + h, left + w))  # noqa: E741
            mask_BHW[rows] |= (ii_H >= t) & (ii_H < b) & (jj_W >= l) & (jj_W < r)
            done_B[rows] += new[placed]
            growing_B[:] = False
            growing_B[rows] = done_B[rows] < count_B[rows]
        return _top_up(rng, mask_BHW, count_B - done_B)

    def _first_block(self, rng: np.random.Generator, mask_RHW: np.ndarray, budget_R: np.ndarray):
        """One call of BEiT's ``_mask`` per row: its 10 tries drawn at once, the first that fits wins.

        The tries of one call all see the same mask (BEiT returns at the first placed block), so
        drawing them together changes nothing but the order the random numbers are used in.
        Returns per row the rectangle (top, left, h, w) and the cells it adds (0: none placed).
        """
        H, W = self.grid
        lo = self.cfg.min_block_area
        R, T = len(budget_R), _BEIT_ATTEMPTS
        u_RT4 = rng.random((R, T, 4))
        budget_RT = budget_R[:, None]
        # BEiT draws uniform(min_area, budget) even when budget < min_area (then <= min_area).
        area = lo + (budget_RT - lo) * u_RT4[..., 0]
        aspect = np.exp(self._log_aspect[0] + (self._log_aspect[1] - self._log_aspect[0]) * u_RT4[..., 1])
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint rounds half to even, as Python's round
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (w < W) & (h < H)  # BEiT never lets one block span the whole grid
        h, w = np.where(fits, h, 0), np.where(fits, w, 0)
        top = (u_RT4[..., 2] * (H - h + 1)).astype(np.int64)
        left = (u_RT4[..., 3] * (W - w + 1)).astype(np.int64)
        # Cells already masked inside each rectangle, from the rows' integral images.
        sum_RHW = np.zeros((R, H + 1, W + 1), dtype=np.int32)
        sum_RHW[:, 1:, 1:] = mask_RHW.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
        r = np.arange(R)[:, None]
        inside = (sum_RHW[r, top + h, left + w] - sum_RHW[r, top, left + w] - sum_RHW[r, top + h, left]
                  + sum_RHW[r, top, left])
        new = h * w - inside
        # Only place blocks that add something and do not overshoot the budget.
        ok_RT = fits & (new > 0) & (new <= budget_RT)
        first = (r[:, 0], ok_RT.argmax(1))  # the first try that fits (try 0 when none does: new = 0 below)
        return top[first], left[first], h[first], w[first], np.where(ok_RT.any(1), new[first], 0)


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


def _top_up(rng: np.random.Generator, mask_BHW: np.ndarray, gap_B: np.ndarray) -> np.ndarray:
    """Set ``gap_B[b]`` random free cells of each row (BEiT's blocks often fall short of the count)."""
    B = mask_BHW.shape[0]
    flat_BN = mask_BHW.reshape(B, -1)
    key_BN = rng.random(flat_BN.shape) + flat_BN  # free cells (key < 1) sort first, in random order
    rank_BN = np.empty_like(flat_BN, dtype=np.int64)
    np.put_along_axis(rank_BN, key_BN.argsort(1), np.arange(flat_BN.shape[1])[None, :], axis=1)
    flat_BN |= rank_BN < gap_B[:, None]
    return mask_BHW


def keep_to_mask(keep_idx_BK: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean (B, N) mask, True at masked (not kept) positions."""
    B = keep_idx_BK.shape[0]
    mask_BN = torch.ones(B, num_patches, dtype=torch.bool, device=keep_idx_BK.device)
    mask_BN.scatter_(1, keep_idx_BK, False)
    return mask_BN

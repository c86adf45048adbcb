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
from pathlib import Path

import numpy as np
import torch

from uta_core.loss import keep_to_mask

__all__ = [
    "STRATEGIES",
    "MaskConfig",
    "MaskGenerator",
    "make_mask_generator",
    "mask_generator_from_config",
    "keep_to_mask",
    "masking_probability",
    "centre_border_means",
    "plot_masking_maps",
]

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

    @classmethod
    def from_config(cls, cfg: MaskConfig, grid: tuple[int, int]) -> MaskGenerator:
        return cls(cfg, grid)

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


def make_mask_generator(strategy: str, grid: tuple[int, int], mask_ratio: float, **options) -> MaskGenerator:
    """Build a generator; ``options`` are the other ``MaskConfig`` fields."""
    try:
        cfg = MaskConfig(strategy=strategy, mask_ratio=mask_ratio, **options)
    except TypeError as err:  # an unknown keyword: name it as a config error
        raise ValueError(f"unknown masking option in {sorted(options)}: {err}") from None
    return MaskGenerator(cfg, grid)


def mask_generator_from_config(cfg: MaskConfig, grid: tuple[int, int]) -> MaskGenerator:
    return MaskGenerator(cfg, grid)


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


def masking_probability(
    generator: MaskGenerator, num_samples: int = 5000, seed: int = 0, batch_size: int = 500
) -> torch.Tensor:
    """(H, W) float: fraction of ``num_samples`` masks in which each patch is MASKED."""
    g = torch.Generator().manual_seed(seed)
    masked_N = torch.zeros(generator.num_patches, dtype=torch.float64)
    for start in range(0, num_samples, batch_size):
        keep_idx_BK = generator(min(batch_size, num_samples - start), g)
        masked_N += keep_to_mask(keep_idx_BK, generator.num_patches).sum(0)
    return (masked_N / num_samples).float().reshape(generator.grid)


def centre_border_means(prob_HW: torch.Tensor, centre: int = 4) -> tuple[float, float]:
    """Mean of the central ``centre`` x ``centre`` patches and of the outermost ring."""
    H, W = prob_HW.shape
    if H < centre + 2 or W < centre + 2:
        raise ValueError(f"grid {H}x{W} is too small for a {centre}x{centre} centre inside a border ring")
    top, left = (H - centre) // 2, (W - centre) // 2
    centre_mean = prob_HW[top : top + centre, left : left + centre].mean().item()
    ring_HW = torch.ones(H, W, dtype=torch.bool)
    ring_HW[1:-1, 1:-1] = False
    return centre_mean, prob_HW[ring_HW].mean().item()


def plot_masking_maps(maps: dict[str, torch.Tensor], path: str | Path) -> None:
    """One PNG with the (H, W) masking-probability maps side by side, as the UTA paper's Fig. 3."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_maps(maps)
    fig = Figure(figsize=(3.2 * len(maps) + 1.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (name, prob_HW) in zip(axes, maps.items()):
        p = prob_HW.detach().float().cpu()
        image = ax.imshow(p.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"{name}\nmean {p.mean():.3f}  min {p.min():.3f}  max {p.max():.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="P(masked)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _check_maps(maps: dict[str, torch.Tensor]) -> None:
    if not maps:
        raise ValueError("maps is empty; pass at least one {name: (H, W) probability map}")
    for name, prob_HW in maps.items():
        if not isinstance(prob_HW, torch.Tensor) or prob_HW.ndim != 2:
            raise ValueError(f"map {name!r} must be a 2-D (H, W) tensor, got {getattr(prob_HW, 'shape', type(prob_HW))}")
        if prob_HW.numel() and not (0.0 <= prob_HW.min().item() and prob_HW.max().item() <= 1.0):
            raise ValueError(f"map {name!r} holds values outside [0, 1]; pass probabilities, not counts")

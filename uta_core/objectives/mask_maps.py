"""Per-location masking probability of a strategy, as the UTA paper's Fig. 3 draws it."""

from __future__ import annotations

from pathlib import Path

import torch

from uta_core.objectives.masking import MaskGenerator, keep_to_mask


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
            got = getattr(prob_HW, "shape", type(prob_HW))
            raise ValueError(f"map {name!r} must be a 2-D (H, W) tensor, got {got}")
        if prob_HW.numel() and not (0.0 <= prob_HW.min().item() and prob_HW.max().item() <= 1.0):
            raise ValueError(f"map {name!r} holds values outside [0, 1]; pass probabilities, not counts")

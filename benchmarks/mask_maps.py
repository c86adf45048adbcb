"""Masking-probability maps of every strategy (the UTA paper's Fig. 3) and generation speed.

    ./uta bench mask_maps [--grid 14 14] [--ratio 0.5] [--samples 5000] [--out outputs/mask_maps.png]

Prints one row a strategy: mean/min/max of P(masked), the central 4x4 and outermost-ring
means, their ratio, and milliseconds per 1,000 masks; writes the maps side by side as a PNG.
Expected: block has a hot centre, block_reversed is flat, gaussian a cold (kept) centre.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from uta_core.objectives.mask_maps import centre_border_means, masking_probability, plot_masking_maps  # noqa: E402
from uta_core.objectives.masking import STRATEGIES, MaskConfig, MaskGenerator  # noqa: E402


def ms_per_1000(gen: MaskGenerator, num_masks: int = 2000, batch_size: int = 500) -> float:
    g = torch.Generator().manual_seed(0)
    gen(batch_size, g)  # warm-up: first-call allocations are not the steady state
    start = time.perf_counter()
    for begin in range(0, num_masks, batch_size):
        gen(min(batch_size, num_masks - begin), g)
    return (time.perf_counter() - start) * 1e3 * 1000 / num_masks


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("H", "W"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("outputs/mask_maps.png"))
    args = parser.parse_args(argv)

    grid = tuple(args.grid)
    maps = {}
    print(f"grid {grid[0]}x{grid[1]}, mask ratio {args.ratio}, {args.samples} samples; P(masked) per location")
    print(f"{'strategy':<15} {'mean':>6} {'min':>6} {'max':>6} {'centre':>7} {'border':>7} {'c/b':>6} {'ms/1k':>7}")
    for strategy in STRATEGIES:
        gen = MaskGenerator(MaskConfig(strategy=strategy, mask_ratio=args.ratio), grid)
        prob_HW = masking_probability(gen, args.samples, seed=0)
        centre, border = centre_border_means(prob_HW)
        maps[strategy] = prob_HW
        print(
            f"{strategy:<15} {prob_HW.mean():6.3f} {prob_HW.min():6.3f} {prob_HW.max():6.3f} "
            f"{centre:7.3f} {border:7.3f} {centre / border:6.2f} {ms_per_1000(gen):7.1f}"
        )
    plot_masking_maps(maps, args.out)
    print(f"wrote {args.out}")
    return maps


if __name__ == "__main__":
    main()

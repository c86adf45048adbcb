"""Cost of drawing one micro-batch's masks, per strategy, against BEiT's own per-image loop.

    ./uta bench masking                          # 14x14 (ViT-B/16) and 16x16 (ViT-L/14) grids, ratio 0.5
    ./uta bench masking --batches 32 128 --repeats 5 --grids 14

``MaskGenerator`` draws a whole micro-batch at once: ``random`` and ``gaussian`` are a top-k
of scores; ``block`` and ``block_reversed`` run BEiT's rectangle loop for every image at once
(one round of array operations per block). The reference column is BEiT's
``MaskingGenerator`` as written, one image at a time in Python (``tests/reference``). The
training loop draws masks on its prefetch thread, ahead of the step (``train.prefetch``).
Times are the median of ``--repeats`` draws on one thread.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import torch  # noqa: E402
from beit_masking import beit_block_mask  # noqa: E402

from uta_core.objectives.masking import STRATEGIES, MaskConfig, MaskGenerator  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[14, 16], help="square grid sides")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"mask ratio {args.mask_ratio}, median of {args.repeats} draws, one thread; ms per micro-batch "
          f"(us per image); load average {load}\n")
    header = ["grid", "B", *STRATEGIES, "BEiT loop (block)", "block vs BEiT loop", "block_reversed vs random"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for side in args.grids:
        grid = (side, side)
        masked = round(side * side * args.mask_ratio)
        for B in args.batches:
            gen = torch.Generator().manual_seed(0)
            ms = {s: median_ms(lambda g=MaskGenerator(MaskConfig(strategy=s, mask_ratio=args.mask_ratio), grid):
                               g(B, gen), args.repeats) for s in STRATEGIES}
            rnd = random.Random(0)
            ref = median_ms(lambda: [beit_block_mask(rnd, side, side, masked) for _ in range(B)],
                            max(3, args.repeats // 4))
            cells = [f"{ms[s]:.2f} ({1e3 * ms[s] / B:.0f})" for s in STRATEGIES]
            print(f"| {side}x{side} | {B} | " + " | ".join(cells) + f" | {ref:.2f} ({1e3 * ref / B:.0f}) | "
                  f"{ref / ms['block']:.1f}x faster | {ms['block_reversed'] / ms['random']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

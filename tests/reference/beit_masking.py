"""BEiT's block masking (``MaskingGenerator`` of microsoft/unilm beit/masking_generator.py, as
EVA-02 uses it), line by line in plain Python on one image, plus the random top-up to an exact
count that UTA's fixed K needs. The reference the vectorised ``uta_core`` version is tested and
benchmarked against."""

from __future__ import annotations

import math
import random

import torch


def beit_block_mask(rnd: random.Random, H: int, W: int, count: int, min_area=16, aspect_min=0.3):
    """BEiT's MaskingGenerator line by line (Python ``random``), then a random top-up to ``count``."""
    log_aspect = (math.log(aspect_min), math.log(1 / aspect_min))
    mask = [[0] * W for _ in range(H)]

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rnd.uniform(min_area, max_mask_patches)
            aspect = math.exp(rnd.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < W and h < H:
                top, left = rnd.randint(0, H - h), rnd.randint(0, W - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    done = 0
    while done < count:
        delta = _mask(count - done)
        if delta == 0:
            break
        done += delta
    free = [(i, j) for i in range(H) for j in range(W) if not mask[i][j]]
    for i, j in rnd.sample(free, count - done):
        mask[i][j] = 1
    return torch.tensor(mask, dtype=torch.float32)

"""UTA vs FD vs MIM: analytic FLOPs of a training step and measured forward+backward time.

    ./uta bench step_cost                      # base student, 224 px, patch 14, ratios 0.5 and 0.4
    ./uta bench step_cost --variant tiny --batch 8 --repeats 5

All three objectives are timed round-robin in the same process (so drift in machine
load hits them alike), and the table reports each as a ratio to MIM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from uta_core.models.flops import step_flops, student_shape, teacher_shape
from uta_core.models.student import build_student
from uta_core.objectives.alignment import fd_loss, gather_kept, keep_to_mask, mim_loss, uta_loss
from uta_core.objectives.masking import MaskConfig, MaskGenerator


def make_steps(model, images, teacher_BND, keep_BK):
    mask_BN = keep_to_mask(keep_BK, model.num_patches)
    teacher_kept = gather_kept(teacher_BND, keep_BK)
    return {
        "uta": lambda: uta_loss(model.forward_kept(images, keep_BK), teacher_kept),
        "fd": lambda: fd_loss(model(images), teacher_BND),
        "mim": lambda: mim_loss(model.forward_masked(images, mask_BN), teacher_BND, mask_BN),
    }


def time_steps(steps, model, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 1):  # first round is warm-up
        for name, loss_fn in steps.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_fn().backward()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.4])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher", default="ViT-L-14", help="open_clip arch for the teacher FLOPs column")
    parser.add_argument("--strategy", default="block_reversed")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    out_dim = 768
    model = build_student(args.variant, img_size=args.img_size, patch_size=args.patch_size, out_dim=out_dim)
    shape = student_shape(args.variant, img_size=args.img_size, patch_size=args.patch_size, out_dim=out_dim)
    teacher = teacher_shape(args.teacher, image_size=args.img_size // args.patch_size * 14)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    teacher_BND = torch.randn(args.batch, 1 + model.num_patches, out_dim)
    print(
        f"student {args.variant} {args.img_size}px/{args.patch_size} ({model.num_patches} patches), "
        f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}; "
        f"teacher {args.teacher} forward = {teacher.num_patches} patches"
    )
    header = f"{'ratio':>5} {'objective':>9} {'tokens':>6} {'GFLOPs/img':>10} {'FLOPs vs MIM':>12} "
    header += f"{'ms/step':>8} {'time vs MIM':>11} {'+teacher GFLOPs':>15}"
    print(header)
    print("-" * len(header))
    for ratio in args.ratios:
        gen = MaskGenerator(MaskConfig(strategy=args.strategy, mask_ratio=ratio), model.grid)
        keep_BK = gen(args.batch, torch.Generator().manual_seed(0))
        seconds = time_steps(make_steps(model, images, teacher_BND, keep_BK), model, args.repeats)
        flops = {name: step_flops(name, shape, ratio, teacher) for name in seconds}
        for name, sec in seconds.items():
            f = flops[name]
            print(
                f"{ratio:>5.2f} {name:>9} {f.tokens:>6} {f.student_step / 1e9:>10.1f} "
                f"{f.student_step / flops['mim'].student_step:>12.2f} {sec * 1e3:>8.0f} "
                f"{sec / seconds['mim']:>11.2f} {f.teacher_forward / 1e9:>15.1f}"
            )


if __name__ == "__main__":
    main()

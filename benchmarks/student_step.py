"""Student training-step throughput and MFU: UTA (kept tokens only) vs FD (every token).

    ./uta bench student_step                                  # CUDA: base and large, bf16, 224 px, patch 14
    ./uta bench student_step --compile                        # + torch.compile (K is fixed: static shapes)
    ./uta bench student_step --device cpu --variants nano --img-size 32 --patch-size 4 --batch 8

One optimiser step = forward, cosine loss against random teacher tokens, backward, AdamW,
as the training task runs it (bf16 autocast on CUDA; timm's Eva uses PyTorch's fused
scaled-dot-product attention). Steps are timed after warm-up with the device synchronised,
UTA and FD alternating so drift hits both alike. MFU = analytic training FLOPs per second
(``uta_core.models.flops``: 3x the forward) / the device's dense bf16 peak (a table of
known GPUs, or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from uta_core.models.flops import step_flops, student_shape  # noqa: E402
from uta_core.models.student import build_student  # noqa: E402
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, step_loss  # noqa: E402
from uta_core.objectives.masking import MaskConfig, MaskGenerator  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) as vendors state them, by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(variant: str, objective: str, args, device: torch.device):
    torch.manual_seed(0)
    student = build_student(variant, img_size=args.img_size, patch_size=args.patch_size, out_dim=args.out_dim)
    student = student.to(device)
    obj = ObjectiveConfig(name=objective)
    forward = StudentForward(student, obj)
    if args.compile:
        forward = torch.compile(forward)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    masks = MaskGenerator(MaskConfig(strategy="random", mask_ratio=args.mask_ratio), student.grid)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    teacher = torch.randn(args.batch, 1 + student.num_patches, args.out_dim, device=device)
    keep = masks(args.batch, torch.Generator().manual_seed(0)).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            loss = step_loss(forward, images, teacher, keep, obj)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    shape = student_shape(variant, img_size=args.img_size, patch_size=args.patch_size, out_dim=args.out_dim)
    ratio = args.mask_ratio if objective == "uta" else 0.0
    return step, step_flops(objective, shape, ratio).student_step * args.batch


def run(args) -> list[dict]:
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    results = []
    for variant in args.variants:
        steps = {obj: make_step(variant, obj, args, device) for obj in ("uta", "fd")}
        times: dict[str, list[float]] = {obj: [] for obj in steps}
        for i in range(args.warmup + args.steps):
            for obj, (step, _) in steps.items():
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                if i >= args.warmup:
                    times[obj].append(time.perf_counter() - start)
        for obj, (_, flops) in steps.items():
            secs = statistics.median(times[obj])
            tflops = flops / secs / 1e12
            results.append({"variant": variant, "objective": obj, "step_s": secs, "images_per_s": args.batch / secs,
                            "tflops": tflops, "mfu": tflops / peak if peak else None})
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The options of a timed student step (device, batch, geometry, steps, peak); gpu_smoke uses them too."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--out-dim", type=int, default=768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for MFU on an unlisted device")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_step_args(p)
    p.add_argument("--variants", nargs="+", default=["base", "large"])
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    results = run(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nstudent step on {name}: batch {args.batch}, {args.img_size} px / patch {args.patch_size}, "
          f"UTA mask {args.mask_ratio} vs FD, {'bf16' if args.device.startswith('cuda') else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}; median of {args.steps} steps")
    print(f"  {'variant':<8} {'objective':<9} {'step s':>8} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'UTA/FD time':>12}")
    by = {(r["variant"], r["objective"]): r for r in results}
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        ratio = by[(r["variant"], "uta")]["step_s"] / by[(r["variant"], "fd")]["step_s"]
        print(f"  {r['variant']:<8} {r['objective']:<9} {r['step_s']:>8.4f} {r['images_per_s']:>9.1f} "
              f"{r['tflops']:>8.2f} {mfu:>6} {ratio if r['objective'] == 'uta' else 1.0:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One script that says whether a GPU node is ready for UTA, and how fast it is: no Ray, ``uta_core`` only.

    ./uta bench gpu_smoke                 # on a GPU node: EVA-02 base student, ViT-L-14 teacher
    ./uta bench gpu_smoke --tiny          # any machine, seconds: the same checks at toy sizes (CI runs this)

Sized to stay well under 10 minutes on one GPU (84 student steps, 14 teacher batches of 256,
two processes for DDP); it prints its own wall time. Sections, each a table; a
failed check prints FAIL and the script exits 1:

1. environment: torch and its CUDA build, the NVIDIA driver (and ``uta_core.device``'s verdict),
   GPU name and compute capability, NCCL version, bf16 support.
2. student step per objective (uta / fd / mim), without and with gradient checkpointing:
   ``uta_core.optim.train_step`` as the training task runs it (bf16 autocast on CUDA, fused
   AdamW); checks a finite loss, the student's bf16 output tokens against fp32 on the same
   weights and batch (every token's cosine > 0.99), and a fused attention kernel in the
   profile (flash / memory-efficient / cuDNN on CUDA, the CPU flash kernel on CPU); reports
   ms/step, peak GPU memory and MFU (analytic FLOPs, ``uta_core.models.flops``, over the
   device's dense bf16 peak).
3. teacher: bf16 vs fp32 token cosine on the same views; views/s of the teacher actor's
   per-batch work (host uint8 views -> pinned copy -> normalise -> tokens -> float16 codec
   bytes on the host, ``uta_core.cache.writer.teacher_tokens`` + ``TokenCodec.encode``) vs the
   bare forward on views already on the device.
4. checkpoint: a training state saved from the device loads on a CPU-only process
   (``uta_core.checkpoint.load_state`` in a child process that hides every GPU).
5. DDP: two processes, one ``train_step`` each on a DDP-wrapped student (NCCL when there are
   two GPUs, else gloo on CPU); the parameters must agree after the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop lines stay out of the tables
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from student_step import add_step_args, peak_tflops, sync  # noqa: E402

from uta_core.cache.codecs import TokenCodec  # noqa: E402
from uta_core.cache.writer import teacher_tokens  # noqa: E402
from uta_core.checkpoint import Position, load_state, save_state, training_state  # noqa: E402
from uta_core.data.views import to_model_input  # noqa: E402
from uta_core.device import cuda_problem, nvidia_driver_version  # noqa: E402
from uta_core.models.clip import tiny_clip_config  # noqa: E402
from uta_core.models.flops import step_flops, student_shape  # noqa: E402
from uta_core.models.student import build_student  # noqa: E402
from uta_core.models.teacher import TeacherConfig, build_teacher  # noqa: E402
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, prepare_student, step_loss  # noqa: E402
from uta_core.objectives.masking import MaskConfig, MaskGenerator  # noqa: E402
from uta_core.optim import OptimConfig, build_optimizer, build_scheduler, train_step  # noqa: E402

FAILED: list[str] = []
# The fused attention kernels' names in a profile (CUDA: flash / memory-efficient / cuDNN; CPU: flash).
FUSED_ATTENTION = ("flash", "efficient_attention", "cudnn_attention", "fmha")


def check(ok: bool, what: str) -> str:
    if not ok:
        FAILED.append(what)
    return "ok" if ok else "FAIL"


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# --------------------------------------------------------------------- 1. environment
def environment(device: torch.device) -> None:
    rows = [["torch", torch.__version__], ["CUDA build", torch.version.cuda or "none (CPU build)"],
            ["NVIDIA driver", nvidia_driver_version() or "none"]]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        rows += [["GPU", f"{torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}"],
                 ["compute capability", f"{major}.{minor}"],
                 ["NCCL", ".".join(map(str, torch.cuda.nccl.version()))],
                 ["bf16", check(torch.cuda.is_bf16_supported(), "bf16 support")]]
    else:
        why = cuda_problem() if not torch.cuda.is_available() else "--device cpu"
        rows.append(["CUDA", f"not used: {why}"])
    rows.append(["CPU threads", torch.get_num_threads()])
    table("1. environment", ["item", "value"], rows)


# --------------------------------------------------------------------- 2. student step
def student_step(args, device: torch.device, peak: float | None) -> None:
    rows = []
    for objective in ("uta", "fd", "mim"):
        for ckpt in (False, True):
            rows.append(_student_row(args, device, peak, objective, ckpt))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table(f"2. student step: {args.student}, batch {args.batch}, {args.img_size} px / patch {args.patch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, block_reversed 0.5; median of {args.steps} steps",
          ["objective", "grad ckpt", "loss", "finite", "bf16 vs fp32 tokens (min cos)", "fused attention", "ms/step",
           "peak GiB", "MFU"], rows)


def _student_row(args, device: torch.device, peak: float | None, objective: str, ckpt: bool) -> list:
    torch.manual_seed(0)
    student = build_student(args.student, img_size=args.img_size, patch_size=args.patch_size,
                            out_dim=args.out_dim).to(device)
    obj = ObjectiveConfig(name=objective)
    prepare_student(student, obj)
    student.set_grad_checkpointing(ckpt)
    forward = StudentForward(student, obj)
    opt = build_optimizer(student, OptimConfig(lr=1e-4))
    sched = build_scheduler(opt, OptimConfig(lr=1e-4), warmup_steps=1, total_steps=10**6)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    teacher = torch.randn(args.batch, 1 + student.num_patches, args.out_dim, generator=gen).to(device)
    masks = MaskGenerator(MaskConfig(strategy="block_reversed", mask_ratio=0.5), student.grid)
    keep = masks(args.batch, gen).to(device)

    with torch.no_grad():  # bf16 vs fp32 student tokens on the same weights and batch
        fp32 = forward(images, keep).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = forward(images, keep).float()
        token_cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1).min().item()

    def step():
        return train_step(forward, opt, sched, [lambda: step_loss(forward, images, teacher, keep, obj)], 1,
                          grad_clip=1.0, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                          device_type=device.type)

    for _ in range(args.warmup):
        step()
    with torch.profiler.profile() as prof:
        step()
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        out = step()
        sync(device)
        times.append(time.perf_counter() - start)
    loss = out["loss"].item()
    secs = statistics.median(times)
    shape = student_shape(args.student, img_size=args.img_size, patch_size=args.patch_size, out_dim=args.out_dim)
    flops = step_flops(objective, shape, 0.5 if objective == "uta" else 0.0).student_step * args.batch
    mfu = f"{flops / secs / 1e12 / peak:.1%}" if peak else "-"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
    return [objective, "on" if ckpt else "off", f"{loss:.4f}", check(math.isfinite(loss), f"{objective} finite loss"),
            f"{token_cos:.4f} {check(token_cos > 0.99, f'{objective} bf16 vs fp32')}",
            check(any(k in kernels for k in FUSED_ATTENTION), f"{objective} fused attention"),
            f"{1e3 * secs:.1f}", mem, mfu]


# --------------------------------------------------------------------- 3. teacher
def teacher_check(args, device: torch.device, workdir: Path) -> None:
    arch = args.teacher_arch
    if args.tiny:
        arch = str(workdir / "tiny-teacher.json")
        Path(arch).write_text(json.dumps(tiny_clip_config(embed_dim=args.out_dim, image_size=args.img_size,
                                                          patch_size=args.patch_size)))
    teachers = {p: build_teacher(TeacherConfig(arch=arch, pretrained=args.teacher_pretrained, precision=p),
                                 random_seed=None if args.teacher_pretrained else 0, device=device)
                for p in ("fp32", "bf16")}
    size = teachers["fp32"].image_size
    gen = torch.Generator().manual_seed(0)
    views_BHW3 = torch.randint(0, 256, (args.teacher_batch, size, size, 3), dtype=torch.uint8, generator=gen).numpy()
    with torch.no_grad():
        ref = teacher_tokens(teachers["fp32"], views_BHW3, device).float()
        low = teacher_tokens(teachers["bf16"], views_BHW3, device).float()
    cos = torch.nn.functional.cosine_similarity(ref, low, dim=-1)
    teacher = teachers[args.teacher_precision]
    codec = TokenCodec("float16", tuple(ref.shape[1:]))
    on_device = torch.from_numpy(views_BHW3).to(device)

    def actor():  # the teacher actor's per-batch work, host views to host bytes
        codec.encode(teacher_tokens(teacher, views_BHW3, device))

    def bare():
        teacher.encode_tokens(to_model_input(on_device, teacher.mean, teacher.std))

    speeds = {}
    with torch.no_grad():
        for name, fn in (("actor", actor), ("bare", bare)):
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.teacher_steps):
                fn()
            sync(device)
            speeds[name] = args.teacher_batch * args.teacher_steps / (time.perf_counter() - start)
    table(f"3. teacher: {arch if not args.tiny else 'tiny'} ({args.teacher_pretrained or 'random init'}), "
          f"{tuple(ref.shape[1:])} tokens per view, batch {args.teacher_batch}",
          ["bf16 vs fp32 token cosine (mean / min)", "check", f"actor views/s ({args.teacher_precision})",
           "bare forward views/s", "actor / bare"],
          [[f"{cos.mean():.5f} / {cos.min():.5f}", check(cos.min().item() > 0.99, "teacher bf16 cosine"),
            f"{speeds['actor']:.1f}", f"{speeds['bare']:.1f}", f"{speeds['actor'] / speeds['bare']:.2f}x"]])


# --------------------------------------------------------------------- 4. checkpoint
def checkpoint_check(args, device: torch.device, workdir: Path) -> None:
    student = build_student("nano", img_size=32, patch_size=4, out_dim=16).to(device)
    opt = build_optimizer(student, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, OptimConfig(lr=1e-3), warmup_steps=1, total_steps=10)
    images = torch.randn(2, 3, 32, 32, device=device)
    student(images).float().pow(2).mean().backward()
    opt.step()  # optimizer state (exp_avg ...) on the device too
    save_state(training_state(student, opt, sched, Position(step=1), {}, {}, {}), workdir, 1)
    code = ("import sys, torch; from uta_core.checkpoint import load_state; s = load_state(sys.argv[1]); "
            "t = [v for v in s['model'].values()] + [v for st in s['optimizer']['state'].values() for v in st.values() "
            "if torch.is_tensor(v)]; assert not torch.cuda.is_available(); "
            "print(len(t), all(x.device.type == 'cpu' for x in t))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, env=env,
                          timeout=300)
    ok = proc.returncode == 0 and proc.stdout.split()[-1:] == ["True"]
    same = torch.equal(load_state(workdir)["model"]["head.weight"].cpu(), student.state_dict()["head.weight"].cpu())
    table("4. checkpoint", ["saved from", "loads on a CPU-only process", "tensors", "values kept"],
          [[device.type, check(ok, "checkpoint loads on CPU") + ("" if ok else f" ({proc.stderr[-300:]!r})"),
            proc.stdout.split()[0] if ok else "-", check(same, "checkpoint values")]])


# --------------------------------------------------------------------- 5. DDP
def _ddp_rank(rank: int, world: int, port: int, backend: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights; every rank its own batch
    student = build_student("nano", img_size=32, patch_size=4, out_dim=16).to(device)
    obj = ObjectiveConfig(name="uta")
    prepare_student(student, obj)
    forward = torch.nn.parallel.DistributedDataParallel(StudentForward(student, obj),
                                                        device_ids=[rank] if backend == "nccl" else None)
    opt = build_optimizer(student, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, OptimConfig(lr=1e-2), warmup_steps=0, total_steps=10)
    gen = torch.Generator().manual_seed(rank + 1)
    images = torch.randn(4, 3, 32, 32, generator=gen).to(device)
    teacher = torch.randn(4, 65, 16, generator=gen).to(device)
    keep = MaskGenerator(MaskConfig(strategy="random", mask_ratio=0.5), student.grid)(4, gen).to(device)
    before = torch.cat([p.detach().flatten() for p in student.parameters()]).clone()
    train_step(forward, opt, sched, [lambda: step_loss(forward, images, teacher, keep, obj)], 1, grad_clip=1.0,
               device_type=device.type)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    gathered = [torch.zeros_like(after) for _ in range(world)]
    dist.all_gather(gathered, after)
    if rank == 0:
        Path(out).write_text(json.dumps({"agree": all(torch.equal(g, gathered[0]) for g in gathered),
                                         "moved": (after - before).abs().max().item()}))
    dist.destroy_process_group()


def ddp_check(workdir: Path) -> None:
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"
    out = workdir / "ddp.json"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    # Each rank is this script in its own process (importable however this module was loaded).
    procs = [subprocess.Popen([sys.executable, __file__, "--ddp-rank", str(rank), str(port), backend, str(out)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for rank in range(2)]
    codes = [proc.wait(timeout=300) for proc in procs]
    if any(codes) or not out.exists():
        check(False, "DDP step")
        table("5. DDP", ["processes", "backend", "exit codes"], [[2, backend, f"{codes} FAIL"]])
        return
    res = json.loads(out.read_text())
    table("5. DDP", ["processes", "backend", "parameters agree after one step", "max update", "s (with start-up)"],
          [[2, backend, check(res["agree"] and res["moved"] > 0, "DDP step"), f"{res['moved']:.2e}",
            f"{time.perf_counter() - start:.1f}"]])


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_step_args(p)
    p.add_argument("--tiny", action="store_true", help="toy sizes: nano student, 32 px, tiny teacher (CI)")
    p.add_argument("--student", default="base")
    p.add_argument("--teacher-arch", default="ViT-L-14-quickgelu")
    p.add_argument("--teacher-pretrained", default=None, help="weights (tag, file, s3://); default random init")
    p.add_argument("--teacher-precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--teacher-batch", type=int, default=256)
    p.add_argument("--teacher-steps", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["student", "teacher", "checkpoint", "ddp"])
    p.add_argument("--ddp-rank", nargs=4, metavar=("RANK", "PORT", "BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_rank:  # one process of section 5
        rank, port, backend, out = args.ddp_rank
        _ddp_rank(int(rank), 2, int(port), backend, out)
        return 0
    if args.tiny:
        args.student, args.batch, args.img_size, args.patch_size, args.out_dim = "nano", 4, 32, 4, 32
        args.steps, args.warmup, args.teacher_batch, args.teacher_steps = 2, 1, 8, 2
    device = torch.device(args.device)
    FAILED.clear()
    start = time.perf_counter()
    environment(device)
    with tempfile.TemporaryDirectory(prefix="uta-gpu-smoke-") as tmp:
        workdir = Path(tmp)
        if "student" not in args.skip:
            student_step(args, device, peak_tflops(device, args.peak_tflops))
        if "teacher" not in args.skip:
            teacher_check(args, device, workdir)
        if "checkpoint" not in args.skip:
            checkpoint_check(args, device, workdir)
        if "ddp" not in args.skip:
            ddp_check(workdir)
    print(f"\n{len(FAILED)} failed check(s){': ' + ', '.join(FAILED) if FAILED else ''}; "
          f"{time.perf_counter() - start:.0f} s; load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

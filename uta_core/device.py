"""Where a process computes, and why CUDA is missing when a job asked for it.

The pinned torch from PyPI is a CUDA 13 build; it needs an NVIDIA driver that supports
CUDA 13 (>= 580). On an older driver ``torch.cuda.is_available()`` is simply False, and a
job would crash at its first ``.to("cuda")`` or, worse, quietly run on CPUs. ``require_cuda``
turns that into one message that names the driver, the build and the fix.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch

# NVIDIA's minimum Linux driver for each CUDA major version (minor-version compatibility).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. ``"535.183.01"``), None without one."""
    try:
        text = DRIVER_FILE.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for [\w]+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


_HERE = object()  # default: this machine's driver / this torch build


def cuda_problem(driver: str | None | object = _HERE, torch_cuda: str | None | object = _HERE) -> str:
    """Why this torch build sees no GPU here, and what to do (driver and build CUDA versions can be given)."""
    torch_cuda = torch.version.cuda if torch_cuda is _HERE else torch_cuda
    if torch_cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; install the project's CUDA build of torch"
    driver = nvidia_driver_version() if driver is _HERE else driver
    if driver is None:
        return "no NVIDIA driver is loaded on this node (no GPU, or the driver is not installed)"
    major = int(torch_cuda.split(".")[0])
    needed = MIN_DRIVER.get(major)
    if needed is not None and int(driver.split(".")[0]) < needed:
        return (f"torch {torch.__version__} is built for CUDA {torch_cuda}, which needs NVIDIA driver >= {needed}, "
                f"but this node has {driver}; upgrade the driver, or install a torch/torchvision pair built "
                "for the node's CUDA (cluster/README.md: GPU drivers)")
    return (f"NVIDIA driver {driver} and torch's CUDA {torch_cuda} should work; check CUDA_VISIBLE_DEVICES and "
            "nvidia-smi")


def require_cuda(what: str) -> None:
    """Raise, with the reason, when ``what`` (e.g. ``cluster.use_gpu=true``) needs CUDA and there is none."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a GPU, but torch sees none on {socket.gethostname()}: {cuda_problem()}")

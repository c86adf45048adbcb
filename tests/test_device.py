"""A job that asks for a GPU where torch sees none says why: the driver it found, the CUDA
version the torch build needs, and what to do."""

from __future__ import annotations

import pytest
import torch

from pipelines import evaluate
from uta_core import device


def test_an_old_driver_is_named_with_the_version_the_build_needs():
    message = device.cuda_problem(driver="535.183.01", torch_cuda="13.0")
    assert "CUDA 13.0, which needs NVIDIA driver >= 580" in message and "this node has 535.183.01" in message


def test_a_new_enough_driver_is_not_blamed():
    message = device.cuda_problem(driver="580.65.06", torch_cuda="13.0")
    assert "should work" in message and ">=" not in message


def test_no_driver_and_a_cpu_build_are_told_apart():
    assert "no NVIDIA driver is loaded" in device.cuda_problem(driver=None, torch_cuda="13.0")
    assert "CPU-only build" in device.cuda_problem(driver="580.1", torch_cuda=None)


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, monkeypatch):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
                       "GCC version:  gcc version 12.3.0\n")
    monkeypatch.setattr(device, "DRIVER_FILE", version)
    assert device.nvidia_driver_version() == "535.183.01"
    monkeypatch.setattr(device, "DRIVER_FILE", tmp_path / "absent")
    assert device.nvidia_driver_version() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_asking_for_cuda_without_one_fails_with_the_reason(capsys):
    with pytest.raises(RuntimeError, match="cluster.use_gpu=true needs a GPU, but torch sees none"):
        device.require_cuda("cluster.use_gpu=true")
    assert evaluate.main(["zeroshot", "model=m", "input.paths=in", "device=cuda"]) == 2
    assert "device=cuda needs a GPU" in capsys.readouterr().err

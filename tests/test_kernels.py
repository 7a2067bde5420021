"""Triton kernels against the PyTorch reference, each check in a child process so that a crash is a failure here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
CHECKS = Path(__file__).with_name("kernel_checks.py")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("check", ["align", "route", "sorted", "dense", "fused", "fused_shapes", "model", "compiled",
                                   "opcheck"])
def test_kernel_matches_pytorch_reference(check, device):
    """On CPU under the interpreter; compiled on a GPU when there is one."""
    env = dict(os.environ, KERNEL_DEVICE=device)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(CHECKS), check, os.environ.get("KERNEL_EXAMPLES", "16")],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode < 0:
        pytest.fail(f"the kernel process crashed (signal {-result.returncode}) in {check} on {device}:\n"
                    f"{result.stderr[-3000:]}")
    output = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), output

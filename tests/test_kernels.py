"""Triton kernels under the CPU interpreter, each check in a child process so that a crash is a failure here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
CHECKS = Path(__file__).with_name("kernel_checks.py")


@pytest.mark.parametrize("check", ["align", "route", "sorted", "dense", "model"])
def test_kernel_matches_pytorch_reference_under_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(CHECKS), check, os.environ.get("KERNEL_EXAMPLES", "16")],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode < 0:
        pytest.fail(f"the Triton interpreter crashed (signal {-result.returncode}) in {check}:\n{result.stderr[-3000:]}")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]

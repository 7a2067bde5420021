"""Data-parallel training: ``torchrun`` with two CPU processes (gloo) trains one expert identically on both ranks,
and the expert is saved once, by rank 0 (examples/learn_data_parallel.py, the README's command)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import task_records, tiny_chat_llama, tiny_chat_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "learn_data_parallel.py"


def _free_port() -> int:
    with socket.socket() as probe:  # torchrun's static rendezvous needs a real port (0 hangs it)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed")
def test_two_processes_train_the_same_expert_and_save_it_once(tmp_path):
    base = tmp_path / "base"
    tiny_chat_llama().save_pretrained(base)
    tiny_chat_tokenizer().save_pretrained(base)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_records("A", "yes", n=32)))
    out = tmp_path / "expert"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = str(torchrun if torchrun.exists() else "torchrun")
    done = subprocess.run(
        [launcher, "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(EXAMPLE), "--base", str(base), "--data", str(data), "--name", "alpha", "--out", str(out), "--cpu",
         "--steps", "6"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    prints = dict(re.findall(r"rank (\d)/2: expert 'alpha' fingerprint (\w+)", done.stdout))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], done.stdout
    assert done.stdout.count("saved ") == 1 and (out / "adapter_model.safetensors").is_file()

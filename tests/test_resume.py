"""Resuming training from Trainer checkpoints: the helpers pass ``resume_from_checkpoint`` through, keep checkpoints
where the user asks, and a run killed (SIGKILL) mid-stage and started again ends with the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from test_training import routing_model, snapshot, task_records

from peft_routing.workflow import learn_task, train_expert

# a constant learning rate: a step too many (Trainer resumed at its last step takes one) changes the weights
STAGE = dict(max_steps=6, save_steps=3, learning_rate=5e-2, per_device_train_batch_size=4, disable_tqdm=True,
             logging_steps=1, lr_scheduler_type="constant", seed=0)
TESTS = Path(__file__).parent


def _lora(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in snapshot(model).items() if "lora_" in name}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


@pytest.fixture
def counted_steps(monkeypatch) -> list[int]:
    """Optimizer steps Trainer actually runs (a resumed stage runs only those after its checkpoint)."""
    count = [0]
    original = transformers.Trainer.training_step

    def counting(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", counting)
    return count


@pytest.mark.parametrize(("checkpoint", "remaining"), [("checkpoint-3", 3), ("checkpoint-6", 0)])
def test_train_expert_resumes_from_a_checkpoint_and_runs_only_the_remaining_steps(tmp_path, counted_steps,
                                                                                  checkpoint, remaining):
    data = task_records("A", "yes")
    model, tokenizer = routing_model()
    train_expert(model, "alpha", data, tokenizer, **STAGE, save_strategy="steps", output_dir=str(tmp_path / "run"))
    uninterrupted = _lora(model)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3", "checkpoint-6"] and counted_steps[0] == 6
    counted_steps[0] = 0
    model, tokenizer = routing_model()
    report = train_expert(model, "alpha", data, tokenizer, **STAGE, output_dir=str(tmp_path / "again"),
                          resume_from_checkpoint=str(tmp_path / "run" / checkpoint))
    assert counted_steps[0] == remaining and report.steps == 6
    _assert_same(_lora(model), uninterrupted)


def test_checkpoints_need_a_folder_of_the_users(tmp_path):
    model, tokenizer = routing_model()
    with pytest.raises(ValueError, match="output_dir"):
        train_expert(model, "alpha", task_records("A", "yes"), tokenizer, **STAGE, save_strategy="steps")
    with pytest.raises(ValueError, match="output_dir"):
        train_expert(model, "alpha", task_records("A", "yes"), tokenizer, **STAGE, resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="output_dir"):
        learn_task(model, "beta", task_records("A", "yes"), tokenizer, resume_from_checkpoint=True)
    assert model.base_model.experts == ["alpha"]


_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import transformers
from test_training import routing_model, task_records
from peft_routing.workflow import learn_task

stage, kill_at = {stage!r}, {kill_at}
original, seen = transformers.Trainer.training_step, [0]
def dying(self, *args, **kwargs):
    if self.model.base_model.phase[0] == stage:
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
transformers.Trainer.training_step = dying
model, tokenizer = routing_model()
learn_task(model, "beta", task_records("b", "no", seed=1), tokenizer, expert_args={args!r}, router_args={args!r},
           output_dir={output_dir!r})
"""


@pytest.mark.parametrize(("stage", "kill_at"), [("expert", 5), ("router", 4)])
def test_a_killed_learn_task_started_again_ends_with_the_uninterrupted_weights(tmp_path, stage, kill_at):
    data = task_records("b", "no", seed=1)
    model, tokenizer = routing_model()
    learn_task(model, "beta", data, tokenizer, expert_args=STAGE, router_args=STAGE, output_dir=tmp_path / "whole")
    uninterrupted, prototype = _lora(model), model.base_model.expert_prototype("beta").vector

    folder = tmp_path / "killed"
    child = textwrap.dedent(_CHILD).format(tests=str(TESTS), stage=stage, kill_at=kill_at, args=STAGE,
                                           output_dir=str(folder))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (folder / stage / "checkpoint-3").is_dir()

    model, tokenizer = routing_model()
    learn_task(model, "beta", data, tokenizer, expert_args=STAGE, router_args=STAGE, output_dir=folder,
               resume_from_checkpoint=True)
    _assert_same(_lora(model), uninterrupted)
    torch.testing.assert_close(model.base_model.expert_prototype("beta").vector, prototype, rtol=0, atol=1e-7)
    assert model.base_model.phase == ("route", None)

"""SIGKILL at every write boundary of every change to a library or an expert folder, then check what survived.

A forked child runs the change with every file-system mutation (create, write, fsync, rename, delete) counted; at
the k-th it kills itself with SIGKILL, as a power cut or the OOM killer would. The parent then opens the library
(which repairs it) and checks: the index is valid, every expert stored before the change loads unchanged, and the
changed expert is either wholly old or wholly new. k runs from 1 until the change completes without being killed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from testing_utils import expert_config, make_base, randomize_routes

from peft_routing import ExpertLibrary
from peft_routing.tuner.expert_folder import read_expert_folder

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

BOUNDARIES = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"),
              (shutil, "rmtree"), (shutil, "copyfileobj")]


def _model(name: str, seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(make_base("llama"), expert_config("llama"), adapter_name=name)
    randomize_routes(model, seed=seed)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return read_expert_folder(folder).tensors


def _run_killed_at(kill_at: int, change: Callable[[], None]) -> bool:
    """Run ``change`` in a child killed at its ``kill_at``-th boundary; True if it was killed (else it finished)."""
    pid = os.fork()
    if pid == 0:  # the child: count boundaries, die at the chosen one
        torch.set_num_threads(1)
        count = [0]
        for module, name in BOUNDARIES:
            original = getattr(module, name)

            def boundary(*args, _original=original, **kwargs):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _original(*args, **kwargs)

            setattr(module, name, boundary)
        try:
            change()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the change failed in the child without being killed"
    return False


def _sweep(make_state: Callable[[Path], Callable[[], None]], check: Callable[[Path, bool], None],
           tmp_path: Path) -> int:
    """Kill at k = 1, 2, ... until the change completes; ``check(root, finished)`` after each. Returns the points."""
    kill_at = 1
    while True:
        root = tmp_path / f"run{kill_at}"
        change = make_state(root)
        killed = _run_killed_at(kill_at, change)
        check(root, not killed)
        if not killed:
            return kill_at - 1
        kill_at += 1


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three saved experts (alpha, beta stored before each change; gamma the one being added or written)."""
    folder = tmp_path_factory.mktemp("experts")
    return {name: _model(name, seed).save_expert(name, folder / name) for seed, name in
            enumerate(("alpha", "beta", "gamma"))}


def _stored_library(root: Path, experts) -> ExpertLibrary:
    library = ExpertLibrary.create(root, "tiny-llama")
    for name in ("alpha", "beta"):
        library.add_from_folder(experts[name], name)
    return library


def _check_library(root: Path, experts, must_have: list[str], changed: str, finished: bool, present: bool) -> None:
    library = ExpertLibrary.open(root)  # repairs what the kill left
    for name in must_have:
        stored = _tensors(library.expert_dir(name))
        assert all(torch.equal(stored[k], v) for k, v in _tensors(experts[name]).items()), name
    if finished:
        assert (changed in library.names) == present
    if changed in library.names:
        stored = _tensors(library.expert_dir(changed))
        assert all(torch.equal(stored[k], v) for k, v in _tensors(experts[changed]).items())
    listing = sorted(p.name for p in (root / "experts").iterdir())
    assert listing == sorted(library.names), listing  # nothing half-written or hidden left behind
    assert library.load_model(make_base("llama")).base_model.experts == library.names


@pytest.mark.parametrize("how", ["add_from_model", "add_from_folder"])
def test_kill_while_adding_to_a_library(how, experts, tmp_path, kill_counts):
    model = _model("gamma", 2) if how == "add_from_model" else None

    def make_state(root):
        library = _stored_library(root, experts)
        if how == "add_from_model":
            return lambda: library.add_from_model(model, "gamma")
        return lambda: library.add_from_folder(experts["gamma"], "gamma")

    points = _sweep(make_state, lambda root, done: _check_library(root, experts, ["alpha", "beta"], "gamma", done,
                                                                  present=True), tmp_path)
    kill_counts[how] = points
    assert points > 5


def test_kill_while_removing_from_a_library(experts, tmp_path, kill_counts):
    def make_state(root):
        library = _stored_library(root, experts)
        library.add_from_folder(experts["gamma"], "gamma")
        return lambda: library.remove("beta")

    def check(root, done):
        _check_library(root, experts, ["alpha", "gamma"], "beta", done, present=False)

    kill_counts["remove"] = _sweep(make_state, check, tmp_path)
    assert kill_counts["remove"] >= 3


def test_kill_while_overwriting_an_expert_folder(experts, tmp_path, kill_counts):
    new = _model("gamma", 7)

    def make_state(root):
        shutil.copytree(experts["gamma"], root / "gamma")
        return lambda: new.save_expert("gamma", root / "gamma", overwrite=True)

    old_tensors = _tensors(experts["gamma"])
    new_tensors = {k: v.detach() for k, v in new.base_model.expert_state_dict("gamma").items()}

    def check(root, done):
        from peft_routing.io.atomic import recover_replaced

        recover_replaced(root / "gamma")
        stored = _tensors(root / "gamma")  # never missing
        is_old = all(torch.equal(stored[k], v) for k, v in old_tensors.items())
        is_new = all(torch.equal(stored[k], v) for k, v in new_tensors.items())
        assert is_new if done else (is_old or is_new)
        leftovers = [p.name for p in root.iterdir() if p.name != "gamma"]
        assert all(".tmp-" in name for name in leftovers), leftovers  # staging only: deleted by the next write

    kill_counts["save_expert(overwrite=True)"] = _sweep(make_state, check, tmp_path)


@pytest.fixture(scope="module")
def kill_counts():
    counts: dict[str, int] = {}
    yield counts
    print("\nkill points survived per change:", counts)


def test_kill_during_the_learn_command(tmp_path, kill_counts):
    """``peft-routing learn`` end to end (training writes nothing into the library, so its kill points are the
    commit's); the library's one stored expert must survive every one."""
    import json

    from testing_utils import task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing.cli import main

    base = tmp_path / "base"
    tiny_chat_llama().save_pretrained(base)
    tiny_chat_tokenizer().save_pretrained(base)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_records("A", "yes", n=4)))
    train = ["--expert-steps", "1", "--router-steps", "1", "--batch-size", "4"]
    first = tmp_path / "first"
    assert main(["learn", "--library", str(first), "--base", str(base), "--name", "alpha", "--data", str(data),
                 "--rank", "2", *train]) == 0
    alpha = _tensors(first / "experts" / "alpha")

    def make_state(root):
        shutil.copytree(first, root)
        return lambda: main(["learn", "--library", str(root), "--name", "beta", "--data", str(data), *train])

    def check(root, done):
        library = ExpertLibrary.open(root)
        stored = _tensors(library.expert_dir("alpha"))
        assert all(torch.equal(stored[k], v) for k, v in alpha.items())
        assert library.names == (["alpha", "beta"] if done else library.names)
        assert sorted(p.name for p in (root / "experts").iterdir()) == sorted(library.names)

    kill_counts["peft-routing learn"] = _sweep(make_state, check, tmp_path)

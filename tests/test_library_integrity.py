"""A library directory read as a stranger may have written it, and left as an interruption may leave it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from testing_utils import expert_config, make_base, make_library, randomize_routes

from peft_routing import ExpertLibrary, RoutingLoraConfig
from peft_routing.cli import main
from peft_routing.demo.tiny_models import tiny_chat_llama, tiny_chat_tokenizer
from peft_routing.workflow.library import LibraryError


def _library(root: Path, names=("alpha", "beta")) -> ExpertLibrary:
    library = ExpertLibrary.create(root, "tiny-llama")
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = get_peft_model(make_base("llama"), expert_config("llama"), adapter_name=name)
        randomize_routes(model, seed=seed)
        library.add_from_model(model, name, training={"seed": seed})
    return library


def _index(root: Path) -> dict:
    return json.loads((root / "library.json").read_text())


def _write_index(root: Path, **changes) -> None:
    data = _index(root)
    data.update(changes)
    (root / "library.json").write_text(json.dumps(data))


HOSTILE_NAMES = ["../outside", "/tmp", "a/b", "", ".", "..", 5, None, "lora_A", "x" * 500, "name with space"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_in_the_index_are_refused_and_nothing_outside_is_touched(tmp_path, name):
    library = _library(tmp_path / "lib")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    _write_index(library.root, experts=[{"name": name, "training": {}}])
    with pytest.raises(LibraryError, match="library.json: expert entry 0"):
        ExpertLibrary.open(library.root)
    assert main(["remove", "--library", str(library.root), "--expert", str(name)]) == 1
    assert (outside / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("changes", [
    {"experts": "alpha"}, {"experts": [["alpha"]]}, {"experts": [{"name": "alpha", "training": 3}]},
    {"format": "other"}, {"base_model": 5},
    {"experts": [{"name": "alpha", "training": {}}, {"name": "alpha", "training": {}}]},
], ids=str)
def test_malformed_indexes_are_refused_with_the_file_named(tmp_path, changes):
    library = _library(tmp_path / "lib")
    _write_index(library.root, **changes)
    with pytest.raises(LibraryError, match="library.json"):
        ExpertLibrary.open(library.root)


@pytest.mark.parametrize("text", [b"{", b"[]", b"\xff\xfe", b"[" * 100_000])
def test_an_unreadable_index_is_refused_with_the_file_named(tmp_path, text):
    library = _library(tmp_path / "lib")
    (library.root / "library.json").write_bytes(text)
    with pytest.raises(LibraryError, match="library.json"):
        ExpertLibrary.open(library.root)


def test_an_expert_folder_that_is_a_symlink_is_never_followed(tmp_path):
    library = _library(tmp_path / "lib")
    outside = tmp_path / "outside"
    shutil.move(library.root / "experts" / "beta", outside)
    (library.root / "experts" / "beta").symlink_to(outside)
    with pytest.raises(LibraryError, match="symlink"):
        library.expert_dir("beta")
    with pytest.raises(LibraryError, match="symlink"):
        library.load_model(make_base("llama"))
    library.remove("beta")
    assert library.names == ["alpha"] and (outside / "adapter_config.json").is_file()


def test_remove_from_the_shell_and_the_rest_still_loads(tmp_path, capsys):
    library = _library(tmp_path / "lib", names=("alpha", "beta", "gamma"))
    assert main(["remove", "--library", str(library.root), "--expert", "beta"]) == 0
    reopened = ExpertLibrary.open(library.root)
    assert reopened.names == ["alpha", "gamma"] and not (library.root / "experts" / "beta").exists()
    assert reopened.load_model(make_base("llama")).base_model.experts == ["alpha", "gamma"]
    assert main(["remove", "--library", str(library.root), "--expert", "beta"]) == 1
    assert "No expert 'beta'" in capsys.readouterr().err


def test_repair_finishes_every_kind_of_interruption(tmp_path, capsys):
    library = _library(tmp_path / "lib", names=("alpha", "beta", "gamma"))
    experts = library.root / "experts"
    (experts / ".delta.tmp-abc").mkdir()  # a staging holder
    (library.root / ".library.json.tmp-xyz").write_text("{")  # a staged index
    shutil.move(experts / "beta", experts / ".removing-beta")  # a removal before its index write
    shutil.copytree(experts / "gamma", experts / ".removing-old")  # a removal after its index write
    shutil.copytree(experts / "alpha", experts / "orphan")  # an install before its index write
    (experts / "junk").mkdir()  # something that is not an expert
    (experts / "junk" / "adapter_config.json").write_text("{")
    shutil.copytree(experts / "gamma", experts / ".gamma.old")  # an overwrite whose new copy is in place
    assert main(["repair", "--library", str(library.root)]) == 0
    report = capsys.readouterr().out
    for words in ("staging leftover .delta.tmp-abc", "interrupted removal of 'beta'", "removal of 'old'",
                  "added 'orphan'", "moved 'junk'", "overwrite of 'gamma'"):
        assert words in report, report
    reopened = ExpertLibrary.open(library.root)
    assert reopened.names == ["alpha", "beta", "gamma", "orphan"] and reopened.repaired == []
    assert sorted(p.name for p in experts.iterdir()) == ["alpha", "beta", "gamma", "orphan"]
    assert [p.name.split("-")[0] for p in (library.root / "lost+found").iterdir()] == ["junk"]
    assert reopened.load_model(make_base("llama")).base_model.experts == ["alpha", "beta", "gamma", "orphan"]
    assert main(["repair", "--library", str(library.root)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_an_overwrite_left_half_done_is_undone(tmp_path):
    library = _library(tmp_path / "lib")
    experts = library.root / "experts"
    shutil.move(experts / "beta", experts / ".beta.old")  # killed between the two renames: target missing
    reopened = ExpertLibrary.open(library.root)
    assert reopened.repaired == ["finished an interrupted overwrite of 'beta'"]
    assert reopened.expert_dir("beta").is_dir()


def test_save_expert_overwrite_never_leaves_the_target_missing(tmp_path, monkeypatch):
    import peft_routing.io.atomic as atomic

    model = make_library("llama", n_experts=1, seed=2)
    folder = model.save_expert("expert_0", tmp_path / "expert")
    seen = []
    original = atomic._exchange

    def exchange(first, second):
        done = original(first, second)
        seen.append((done, second.exists()))
        return done

    monkeypatch.setattr(atomic, "_exchange", exchange)
    model.save_expert("expert_0", folder, overwrite=True)
    assert seen == [(True, True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_generate_on_a_library_with_a_bad_first_expert_fails_loudly(tmp_path, capsys):
    base_folder = tmp_path / "base"
    tiny_chat_llama().save_pretrained(base_folder)
    tiny_chat_tokenizer().save_pretrained(base_folder)
    library = ExpertLibrary.create(tmp_path / "lib", str(base_folder))
    config = RoutingLoraConfig(r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_chat_llama(), config, adapter_name="expert_a")
    library.add_from_model(model, "expert_a")
    weights = library.root / "experts" / "expert_a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, weights)
    assert main(["generate", "--library", str(library.root), "--prompt", "hi"]) == 1
    error = capsys.readouterr().err
    assert "not a finite" in error and str(library.root / "experts" / "expert_a") in error


def test_pull_and_push_carry_only_an_experts_files(tmp_path, monkeypatch):
    from peft_routing.io import hub

    source = make_library("llama", n_experts=1, seed=3).save_expert("expert_0", tmp_path / "source")
    (source / "notes.txt").write_text("not part of an expert")
    (source / "id_rsa").symlink_to(tmp_path / "key")
    (tmp_path / "key").write_text("PRIVATE")
    library = _library(tmp_path / "lib", names=("alpha",))
    library.add_from_folder(source, "pulled")
    assert sorted(p.name for p in library.expert_dir("pulled").iterdir()) == ["adapter_config.json",
                                                                             "adapter_model.safetensors"]
    uploaded = []

    def push(write_folder, repo_id, **kwargs):
        write_folder(tmp_path / "upload")
        uploaded.extend(sorted(p.name for p in (tmp_path / "upload").iterdir()))

    monkeypatch.setattr(hub, "push_folder_to_hub", push)
    shutil.copy(source / "notes.txt", library.expert_dir("pulled") / "notes.txt")  # put there by hand
    assert main(["push", "--library", str(library.root), "--expert", "pulled", "--repo", "you/x"]) == 0
    assert uploaded == ["adapter_config.json", "adapter_model.safetensors"]

"""Every hostile folder of ``hostile_corpus`` against every way an expert gets in: refused with a message naming the
field or file, the model and the library exactly as they were; or, for the harmless ones, loaded and routing as the
unedited expert does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hostile_corpus import CASE_IDS, PAYLOAD_MARKER, cases
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from testing_utils import make_base, make_library, token_batch

from peft_routing import ExpertLibrary

ENTRY_POINTS = ("add_expert", "from_pretrained", "load_adapter", "pull", "library_load")


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory) -> Path:
    donor = make_library("llama", n_experts=1, seed=3)
    return donor.save_expert("expert_0", tmp_path_factory.mktemp("donor") / "expert")


def _case(case_id: str, scratch: Path):
    return next(case for case in cases(scratch) if case.id == case_id)


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(module: torch.nn.Module, before: dict) -> bool:
    after = module.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _library(root: Path, first: Path | None) -> ExpertLibrary:
    """A library whose first expert is ``first`` copied as it is (symlinks too), as if an old version had let it in."""
    if first is None:
        library = ExpertLibrary.create(root, "tiny-llama")
        library.add_from_model(make_library("llama", n_experts=1, seed=5), "expert_0")
        return library
    (root / "experts").mkdir(parents=True)
    shutil.copytree(first, root / "experts" / "stranger", symlinks=True)
    index = {"format": "peft-routing-library", "base_model": "tiny-llama",
             "experts": [{"name": "stranger", "training": {}}]}
    (root / "library.json").write_text(json.dumps(index))
    return ExpertLibrary.open(root)


def _enter(entry: str, folder: Path, tmp_path: Path):
    """Run one entry point on ``folder``; returns (what must stay unchanged, a check of it, the routed model)."""
    if entry in ("add_expert", "load_adapter"):
        model = make_library("llama", n_experts=2, seed=1)
        before, experts = _state(model), list(model.base_model.experts)

        def unchanged() -> bool:
            return _same_state(model, before) and model.base_model.experts == experts

        def run():
            if entry == "add_expert":
                model.add_expert(folder, adapter_name="stranger")
            else:
                model.load_adapter(folder, adapter_name="stranger")
            model.base_model.set_phase("route")
            return model
        return unchanged, run
    if entry in ("from_pretrained", "library_load"):
        base = make_base("llama", seed=1)
        before = _state(base)

        def unchanged() -> bool:
            untouched = not any(isinstance(m, BaseTunerLayer) for m in base.modules())
            return untouched and _same_state(base, before)

        def run():
            if entry == "from_pretrained":
                model = PeftModel.from_pretrained(base, folder, adapter_name="stranger")
                model.base_model.set_phase("route")
                return model
            return _library(tmp_path / "library", folder).load_model(base)
        return unchanged, run
    library = _library(tmp_path / "library", None)
    index = (library.root / "library.json").read_bytes()
    listing = sorted(p.name for p in (library.root / "experts").iterdir())

    def unchanged() -> bool:
        same_listing = sorted(p.name for p in (library.root / "experts").iterdir()) == listing
        return (library.root / "library.json").read_bytes() == index and same_listing

    def run():
        library.add_from_folder(folder, "stranger")
        return ExpertLibrary.open(library.root).load_model(make_base("llama", seed=1))
    return unchanged, run


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_hostile_folder(case_id, entry, valid_folder, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    case = _case(case_id, scratch)
    folder = tmp_path / "stranger"
    shutil.copytree(valid_folder, folder)
    case.edit(folder)
    unchanged, run = _enter(entry, folder, tmp_path)
    if case.expect == "refuse":
        with pytest.raises((ValueError, OSError)) as refusal:
            run()
        message = str(refusal.value)
        assert case.mentions in message, message
        assert unchanged(), f"{entry} changed the model or library while refusing {case.id}"
    else:
        routed = run()
        reference_unchanged, reference_run = _enter(entry, valid_folder, tmp_path / "reference")
        expected = _logits(reference_run())
        tolerance = 2e-2 if "bfloat16" in case.name else 1e-5
        torch.testing.assert_close(_logits(routed), expected, rtol=tolerance, atol=tolerance)
    assert not (tmp_path / PAYLOAD_MARKER).exists(), "a pickle payload ran"


def test_a_pickle_payload_never_runs_even_when_pickle_is_allowed(valid_folder, tmp_path):
    case = _case("files-pickle_only", tmp_path)
    folder = tmp_path / "stranger"
    shutil.copytree(valid_folder, folder)
    case.edit(folder)
    model = make_library("llama", n_experts=2, seed=1)
    with pytest.raises(ValueError, match="not a plain pickle of tensors"):
        model.add_expert(folder, adapter_name="stranger", allow_pickle=True)
    assert not (tmp_path / PAYLOAD_MARKER).exists()


def test_a_plain_pickle_of_tensors_loads_when_allowed(valid_folder, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(valid_folder, folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    model = make_library("llama", n_experts=2, seed=1)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        model.add_expert(folder, adapter_name="pickled")
    assert model.add_expert(folder, adapter_name="pickled", allow_pickle=True) == "pickled"


def test_subfolders_and_hub_paths_cannot_leave_their_folder(valid_folder, tmp_path):
    model = make_library("llama", n_experts=2, seed=1)
    outside = tmp_path / "outside"
    shutil.copytree(valid_folder, outside)
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "link").symlink_to(outside)
    for subfolder in ("../outside", str(outside), "link"):
        with pytest.raises(ValueError, match="subfolder"):
            model.add_expert(holder, adapter_name="stranger", subfolder=subfolder)
    assert model.base_model.experts == ["expert_0", "expert_1"]

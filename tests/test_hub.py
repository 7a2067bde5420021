"""The Hub path with no network: huggingface_hub's real download code against a cache layout the test writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from testing_utils import make_base, make_library, token_batch

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_upload(cache: Path):
    """Replace only the upload call: write the commit's files into the HF cache layout, as a download would."""
    calls = []

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, revision=None, **kw):
        calls.append((repo_id, commit_message))
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / REVISION
        shutil.copytree(folder_path, snapshot / (path_in_repo or ""), dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(REVISION)
        return f"https://hub.invalid/{repo_id}/commit/{REVISION}"

    return calls, upload_folder


@pytest.mark.parametrize("subfolder", [None, "experts/coco"])
def test_push_then_add_expert_by_repo_id(tmp_hf_cache, monkeypatch, subfolder):
    calls, upload_folder = _fake_upload(tmp_hf_cache)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hub.invalid/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    model = make_library("llama", n_experts=2, seed=9)
    model.push_expert_to_hub("expert_1", "org/coco-expert", subfolder=subfolder)
    assert calls and calls[0][0] == "org/coco-expert"

    folder = str(_local_copy(model, "expert_0"))
    fresh = PeftModel.from_pretrained(make_base("llama", 9), folder, adapter_name="expert_0")
    name = fresh.add_expert("org/coco-expert", adapter_name="coco", subfolder=subfolder)
    assert name == "coco" and fresh.experts == ["expert_0", "coco"]
    for library in (model, fresh):
        library.set_phase("route", top_k=2)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def _local_copy(model, name):
    import tempfile

    folder = Path(tempfile.mkdtemp()) / name
    return model.save_expert(name, folder)


def test_unknown_repo_offline_gives_a_clear_error(tmp_hf_cache):
    model = make_library("llama", n_experts=1)
    with pytest.raises(FileNotFoundError, match="not a local folder, and getting it from the Hub failed"):
        model.add_expert("org/does-not-exist")
    assert model.experts == ["expert_0"]


@pytest.mark.parametrize("subfolder", [None, "experts/coco"])
def test_prototypes_travel_through_the_hub_by_every_loader(tmp_hf_cache, monkeypatch, subfolder):
    from peft_routing.tuner.prototype import Prototype

    calls, upload_folder = _fake_upload(tmp_hf_cache)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hub.invalid/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = make_library("llama", n_experts=2, seed=9)
    vector = torch.nn.functional.normalize(torch.arange(1.0, 33.0), dim=0)
    model.base_model.set_prototype("expert_1", Prototype(vector, 0, 0.5, 12))
    model.push_expert_to_hub("expert_1", "org/coco-expert", subfolder=subfolder)
    by_add = make_library("llama", n_experts=1, seed=9)
    by_add.add_expert("org/coco-expert", adapter_name="coco", subfolder=subfolder)
    libraries = [by_add]
    if subfolder is None:  # offline, peft 0.21's own loader looks for sub/sub/... in a Hub subfolder (io/hub.py)
        libraries.append(PeftModel.from_pretrained(make_base("llama", 9), "org/coco-expert", adapter_name="coco"))
    for library in libraries:
        got = library.base_model.expert_prototype("coco")
        assert got.fields() == {"layer": 0, "pooling": "causal_mean", "examples": 12, "floor": 0.5}
        torch.testing.assert_close(got.vector, vector, rtol=0, atol=0)

"""Bad input gets a clear error naming what is wrong, and a library directory is never left half-written."""

from __future__ import annotations

import json

import pytest
from peft import get_peft_model
from testing_utils import LLAMA_TARGETS, tiny_chat_llama

from peft_routing import RoutingLoraConfig
from peft_routing.workflow import DataError, ExpertLibrary, LibraryError, load_examples


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"prompt": "a", "response": "b"}), "{not json"])
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "needs 'messages'"),
    ({"prompt": "x"}, "'response' must be a non-empty string"),
    ({"prompt": "", "response": "y"}, "'prompt' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant's"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "must have a 'role'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user message"),
    ([1, 2], "must be a JSON object"),
    ({"prompt": "x", "response": "y", "image": 3}, "an image must be a file path or a PIL image"),
])
def test_bad_records_are_refused_with_the_reason(tmp_path, record, message):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=message) as error:
        load_examples(path)
    assert "d.jsonl, line 1" in str(error.value)


def test_missing_image_and_empty_data_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "x", "response": "y", "image": "pics/cat.png"})])
    with pytest.raises(FileNotFoundError, match=r"image .*pics/cat\.png does not exist"):
        load_examples(path)
    with pytest.raises(DataError, match="No examples in .*empty"):
        load_examples(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def test_relative_image_paths_are_read_from_the_data_folder(tmp_path):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "pics" / "a.png")
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "x", "response": "y", "image": "pics/a.png"})])
    assert load_examples(path)[0].images == [tmp_path / "pics" / "a.png"]


# ------------------------------------------------------------------------------------------------------- library
def one_expert_model(name: str = "alpha"):
    config = RoutingLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return get_peft_model(tiny_chat_llama(), config, adapter_name=name)


def test_library_round_trip_and_clear_errors(tmp_path):
    library = ExpertLibrary.create(tmp_path / "lib", "some/base")
    model = one_expert_model()
    library.add_from_model(model, "alpha", training={"steps": 3})
    reopened = ExpertLibrary.open(tmp_path / "lib")
    assert reopened.names == ["alpha"] and reopened.entries[0]["training"] == {"steps": 3}
    with pytest.raises(LibraryError, match="already has an expert named 'alpha'"):
        reopened.check_new_name("alpha")
    with pytest.raises(ValueError, match="Invalid expert name"):
        reopened.check_new_name("a.b")
    with pytest.raises(LibraryError, match="is for base model 'some/base'"):
        ExpertLibrary.open_or_create(tmp_path / "lib", "other/base")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(LibraryError, match="is not an expert library"):
        ExpertLibrary.open(tmp_path / "plain")
    with pytest.raises(LibraryError, match="exists and is not an empty directory"):
        ExpertLibrary.create(tmp_path / "plain", "some/base")
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"
    loaded = reopened.load_model(tiny_chat_llama())
    assert loaded.base_model.experts == ["alpha"] and loaded.base_model.phase == ("route", None)


def test_an_interrupted_save_leaves_the_library_as_it_was(tmp_path, monkeypatch):
    library = ExpertLibrary.create(tmp_path / "lib", "some/base")
    model = one_expert_model()
    library.add_from_model(model, "alpha")
    model.add_adapter("beta", RoutingLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    index_before = (tmp_path / "lib" / "library.json").read_text()

    def crash_midway(name, folder, **kwargs):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_expert", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        library.add_from_model(model, "beta")
    assert (tmp_path / "lib" / "library.json").read_text() == index_before
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == [".lock", "experts", "library.json"]
    assert [p.name for p in (tmp_path / "lib" / "experts").iterdir()] == ["alpha"]
    assert ExpertLibrary.open(tmp_path / "lib").names == ["alpha"]

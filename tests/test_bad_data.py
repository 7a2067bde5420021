"""Task data from strangers: every record is checked (with its file and line) before training starts, images are
opened up front and stay inside the data folder, and a failure during training rolls the model back."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_training import FAST, ROUTER_FAST, routing_model, snapshot
from testing_utils import task_records

from peft_routing.workflow import DataError, learn_task, load_examples, train_expert, train_router


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("answer", ["", None, "   ", "\n\t", 5, ["a"], {"text": "a"}])
def test_an_empty_or_non_text_answer_is_refused_with_file_and_line(tmp_path, answer):
    records = [{"prompt": "q", "response": "a"},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}]
    with pytest.raises(DataError, match=r"data.jsonl, line 2"):
        load_examples(_jsonl(tmp_path / "data.jsonl", records))


@pytest.mark.parametrize("record", [
    {"prompt": 5, "response": "a"}, {"prompt": "q", "response": 7}, {"prompt": "q", "response": "  "},
    {"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
])
def test_integer_or_missing_content_is_refused_before_training(tmp_path, record):
    with pytest.raises(DataError, match="data.jsonl, line 1"):
        load_examples(_jsonl(tmp_path / "data.jsonl", [record]))


def test_a_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "a"}\n')
    with pytest.raises(DataError, match=r"data.jsonl, line 2: not UTF-8"):
        load_examples(path)


def test_a_deeply_nested_line_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 1"):
        load_examples(path)


def test_broken_images_are_found_before_training(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.png").write_text("not a picture")
    for name in ("cut.png", "text.png"):
        records = [{"prompt": "q", "response": "a", "image": "good.png"},
                   {"prompt": "q", "response": "a", "image": name}]
        with pytest.raises(DataError, match=rf"line 2: image .*{name} is not a readable picture"):
            load_examples(_jsonl(tmp_path / "data.jsonl", records))


def test_image_paths_stay_inside_the_data_folder_unless_asked(tmp_path):
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    data_dir.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (data_dir / "link.png").symlink_to(outside / "secret.png")
    for image in ("../outside/secret.png", "link.png", str(outside / "secret.png")):
        path = _jsonl(data_dir / "data.jsonl", [{"prompt": "q", "response": "a", "image": image}])
        with pytest.raises(DataError, match="line 1: image"):
            load_examples(path)
        assert load_examples(path, allow_absolute_paths=True)[0].images
    assert load_examples([{"prompt": "q", "response": "a", "image": str(outside / "secret.png")}])[0].images


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["expert", "router", "learn"])
def test_a_failure_during_training_rolls_the_model_back(stage, monkeypatch):
    model, tokenizer = routing_model()
    records = task_records("A", "yes")
    train_expert(model, "alpha", records, tokenizer, **FAST)
    train_router(model, "alpha", records, tokenizer, **ROUTER_FAST)
    model.base_model.set_phase("route", top_k=1)
    before, experts = snapshot(model), model.base_model.experts
    prototype = model.base_model.expert_prototype("alpha").vector.clone()

    import transformers

    original = transformers.Trainer.training_step
    steps = [0]

    def fail_after_two_steps(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] > 2:
            raise _Boom("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", fail_after_two_steps)
    with pytest.raises(_Boom):
        if stage == "expert":
            train_expert(model, "alpha", records, tokenizer, **FAST)
        elif stage == "router":
            train_router(model, "alpha", records, tokenizer, **{**ROUTER_FAST, "max_steps": 6})
        else:
            learn_task(model, "beta", records, tokenizer, expert_args=FAST)
    after = dict(model.named_parameters())
    assert model.base_model.experts == experts and set(after) == set(before)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert torch.equal(model.base_model.expert_prototype("alpha").vector, prototype)
    assert model.base_model.phase == ("route", None) and model.base_model.routing_settings.top_k == 1

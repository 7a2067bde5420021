"""The ``peft-routing`` command on a tiny local base model: learn two tasks, then generate, eval, inspect, push and
pull."""

from __future__ import annotations

import json
import re

import pytest
from testing_utils import task_records, tiny_chat_llama, tiny_chat_tokenizer

from peft_routing.cli import COMMANDS, build_parser, load_for_inference, main
from peft_routing.workflow import ExpertLibrary

TRAIN = ["--expert-steps", "6", "--lr", "2e-2", "--batch-size", "4", "--router-steps", "2",
         "--router-batch-size", "4"]


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_chat_llama().save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_command_has_a_manual(capsys):
    commands = COMMANDS
    assert set(commands) == {"learn", "generate", "eval", "inspect", "push", "pull", "remove", "repair", "build-kernel",
                             "demo"}
    overview = build_parser().format_help()
    assert all(re.search(rf"^    {re.escape(name)}(\s|$)", overview, re.MULTILINE) for name in commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        manual = capsys.readouterr().out
        assert f"usage: peft-routing {name}" in manual and len(manual) > 300, name


def test_learn_generate_eval_inspect_and_pull(tmp_path, base_folder, capsys):
    library = tmp_path / "lib"
    alpha = write_jsonl(tmp_path / "alpha.jsonl", task_records("A", "yes"))
    beta = write_jsonl(tmp_path / "beta.jsonl", task_records("b", "no", seed=1))
    assert main(["learn", "--library", str(library), "--base", str(base_folder), "--name", "alpha",
                 "--data", str(alpha), "--rank", "4", "--alpha", "8", "--top-layers", "1", *TRAIN]) == 0
    assert main(["learn", "--library", str(library), "--name", "beta", "--data", str(beta), *TRAIN]) == 0
    opened = ExpertLibrary.open(library)
    assert opened.names == ["alpha", "beta"]
    assert opened.entries[1]["training"]["router"]["steps"] == 2
    config = json.loads((library / "experts" / "beta" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["layers_to_transform"] == [1]  # copied from the first expert
    capsys.readouterr()

    assert main(["generate", "--library", str(library), "--prompt", "A:abcde", "--max-new-tokens", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "A:abcde" and isinstance(line["answer"], str)

    result = tmp_path / "eval.json"
    assert main(["eval", "--library", str(library), "--data", str(alpha), "--json", str(result)]) == 0
    assert json.loads(result.read_text())["examples"] == 16
    assert main(["eval", "--library", str(library), "--data", str(alpha), "--expert", "alpha"]) == 0

    # learn computed the prototypes, so the prototype routers run from the command line
    assert main(["eval", "--library", str(library), "--data", str(alpha), "--router", "recommended"]) == 0
    args = build_parser().parse_args(["eval", "--library", str(library), "--data", str(alpha), "--router",
                                      "recommended", "--fallback", "none"])
    settings = load_for_inference(args)[0].base_model.routing_settings
    assert (settings.router, settings.prototype_pooling, settings.fallback) == ("prototype", "prompt", "none")

    png = tmp_path / "routing.png"
    assert main(["inspect", "--library", str(library), "--data", str(alpha), "--out", str(png), "--limit", "4",
                 "--router", "token+prototype", "--prototype-pooling", "prompt"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "% of tokens" in capsys.readouterr().out

    other = tmp_path / "other"
    assert main(["learn", "--library", str(other), "--base", str(base_folder), "--name", "gamma", "--data",
                 str(alpha), "--rank", "4", "--top-layers", "1", *TRAIN]) == 0
    assert main(["pull", "--library", str(library), "--repo", str(other / "experts" / "gamma")]) == 0
    assert ExpertLibrary.open(library).names == ["alpha", "beta", "gamma"]


def test_cli_errors_are_clear_and_change_nothing(tmp_path, base_folder, capsys):
    library = tmp_path / "lib"
    alpha = write_jsonl(tmp_path / "alpha.jsonl", task_records("A", "yes"))
    assert main(["learn", "--library", str(library), "--name", "alpha", "--data", str(alpha)]) == 1
    assert "pass the base model (--base)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": 3}\n')
    assert main(["learn", "--library", str(library), "--base", str(base_folder), "--name", "alpha",
                 "--data", str(bad)]) == 1
    assert "bad.jsonl, line 2" in capsys.readouterr().err
    assert not library.exists()
    assert main(["eval", "--library", str(tmp_path), "--data", str(alpha)]) == 1
    assert "is not an expert library" in capsys.readouterr().err


def test_learn_keeps_checkpoints_where_asked_and_resumes_from_them(tmp_path, base_folder):
    alpha = write_jsonl(tmp_path / "alpha.jsonl", task_records("A", "yes"))
    learn = ["learn", "--base", str(base_folder), "--name", "alpha", "--data", str(alpha), "--rank", "4",
             "--alpha", "8", *TRAIN, "--checkpoints", str(tmp_path / "ckpt"), "--save-steps", "3"]
    assert main([*learn, "--library", str(tmp_path / "first")]) == 0
    assert sorted(p.name for p in (tmp_path / "ckpt" / "expert").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (tmp_path / "ckpt" / "router" / "checkpoint-2").is_dir()
    # a second library resumed from those checkpoints learns the same expert without training a step again
    assert main([*learn, "--library", str(tmp_path / "second"), "--resume"]) == 0
    first, second = (ExpertLibrary.open(tmp_path / name) for name in ("first", "second"))
    assert (first.expert_dir("alpha") / "adapter_model.safetensors").read_bytes() == \
        (second.expert_dir("alpha") / "adapter_model.safetensors").read_bytes()

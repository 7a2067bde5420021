"""Expert folders: round trips through a fresh process, plain-LoRA export into stock PEFT, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from testing_utils import expert_config, make_base, make_library, token_batch

from peft_routing import ExpertMismatchError
from peft_routing.tuner.expert_folder import read_expert_folder

REPO = Path(__file__).resolve().parents[1]


def _run_fresh_python(code: str, out: Path) -> torch.Tensor:
    """Run ``code`` in a new interpreter (nothing shared with this process) and load the tensor it saves to ``out``."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, env=env, cwd=REPO)
    return torch.load(out)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot) -> None:
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


def test_saved_folder_is_a_standard_adapter_folder(tmp_path):
    model = make_library("llama", n_experts=2, ranks=[4, 8])
    folder = model.save_expert("expert_1", tmp_path / "e1")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROUTING_LORA" and config["r"] == 8
    assert config["base_model_type"] == "llama" and config["base_hidden_size"] == 32
    assert config["module_shapes"]["model.layers.0.mlp.down_proj"] == [32, 48, 8]
    tensors = load_file(folder / "adapter_model.safetensors")
    routes = [k for k in tensors if k.endswith(".lora_route")]
    assert len(routes) == 14
    assert all(tensors[k].shape == (tensors[k.replace("lora_route", "lora_A.weight")].shape[1],) for k in routes)
    assert not any("expert_1" in k for k in tensors)


def test_round_trip_in_a_fresh_process_gives_identical_logits(tmp_path, monkeypatch):
    # one path in both processes: timed dispatch may pick another (equally right, not bitwise equal) on a busy machine
    monkeypatch.setenv("PEFT_ROUTING_MEASURE", "0")
    model = make_library("qwen2", n_experts=3, ranks=[2, 4, 8], seed=5)
    model.set_phase("route", top_k=2, score_norm="standardize")  # saved with the experts, restored on load
    for name in model.experts:
        model.save_expert(name, tmp_path / name)
    ids = token_batch(2, 7)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    got = _run_fresh_python(
        f"""
        import torch, peft_routing
        from peft import PeftModel
        from testing_utils import make_base
        base = make_base("qwen2", 5)
        model = PeftModel.from_pretrained(base, r"{tmp_path / 'expert_0'}", adapter_name="expert_0")
        model.add_expert(r"{tmp_path / 'expert_1'}")
        model.add_expert(r"{tmp_path / 'expert_2'}")
        assert model.experts == ["expert_0", "expert_1", "expert_2"], model.experts
        model.set_phase("route")
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(r"{tmp_path / 'ids.pt'}")).logits, r"{tmp_path / 'got.pt'}")
        """,
        tmp_path / "got.pt",
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_plain_lora_export_loads_in_stock_peft_without_this_package(tmp_path):
    model = make_library("llama", n_experts=2, seed=4)
    folder = model.save_expert("expert_1", tmp_path / "plain", as_plain_lora=True)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model.set_phase("expert", "expert_1")
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    got = _run_fresh_python(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(4)
        text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        base = LlamaForCausalLM(LlamaConfig(**text)).eval()
        model = PeftModel.from_pretrained(base, r"{folder}")
        assert "peft_routing" not in sys.modules, "stock PEFT must load the export on its own"
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(r"{tmp_path / 'ids.pt'}")).logits, r"{tmp_path / 'got.pt'}")
        """,
        tmp_path / "got.pt",
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_plain_lora_export_keeps_routing_vectors_in_the_side_file(tmp_path):
    model = make_library("llama", n_experts=2, seed=4)
    model.set_phase("route", top_k=2, temperature=0.5)
    model.save_expert("expert_1", tmp_path / "plain", as_plain_lora=True)
    model.save_expert("expert_0", tmp_path / "e0")
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fresh = PeftModel.from_pretrained(make_base("llama", 4), str(tmp_path / "e0"), adapter_name="expert_0")
    assert fresh.add_expert(tmp_path / "plain") == "expert_1"
    assert fresh.peft_config["expert_1"].temperature == 0.5
    fresh.set_phase("route")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)


def test_experts_of_different_ranks_live_in_one_library(tmp_path):
    model = make_library("llama", n_experts=3, ranks=[2, 16, 5])
    ranks = {name: model.peft_config[name].r for name in model.experts}
    assert ranks == {"expert_0": 2, "expert_1": 16, "expert_2": 5}
    model.set_phase("route", top_k=3)
    assert torch.isfinite(model(input_ids=token_batch()).logits).all()


def test_rank_pattern_round_trips(tmp_path):
    config = expert_config("llama", r=4, rank_pattern={"q_proj": 2, "down_proj": 6})
    from peft import get_peft_model

    model = get_peft_model(make_base("llama"), config, adapter_name="mixed")
    model.save_expert("mixed", tmp_path / "mixed")
    other = get_peft_model(make_base("llama"), expert_config("llama"), adapter_name="first")
    other.add_expert(tmp_path / "mixed")
    layer = other.base_model.model.model.layers[1]
    assert layer.self_attn.q_proj.r["mixed"] == 2 and layer.mlp.down_proj.r["mixed"] == 6
    assert layer.self_attn.v_proj.r["mixed"] == 4


# ------------------------------------------------------------------------------------------------------ bad input
def _library_and_expert(tmp_path, **config_overrides):
    donor = make_library("llama", n_experts=1, **config_overrides)
    folder = donor.save_expert("expert_0", tmp_path / "donor")
    model = make_library("llama", n_experts=2, seed=1)
    return model, folder


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def _edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(values)
    (folder / "adapter_config.json").write_text(json.dumps(config))


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
ROUTE_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_route"


def _wrong_shape(tensors):
    tensors[A_KEY] = torch.zeros(4, 31)


def _unknown_module(tensors):
    for kind, shape in (("lora_A.weight", (4, 32)), ("lora_B.weight", (32, 4)), ("lora_route", (32,))):
        tensors[f"base_model.model.model.layers.9.self_attn.q_proj.{kind}"] = torch.zeros(shape)


def _missing_module(tensors):
    for kind in ("lora_A.weight", "lora_B.weight", "lora_route"):
        del tensors[f"base_model.model.model.layers.1.mlp.up_proj.{kind}"]


def _no_routes(tensors):
    for key in [k for k in tensors if k.endswith(".lora_route")]:
        del tensors[key]


def _non_finite(tensors):
    tensors[ROUTE_KEY] = torch.full_like(tensors[ROUTE_KEY], float("nan"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_wrong_shape, r"module 'model.layers.0.self_attn.q_proj' have shapes \{'lora_A': \(4, 31\)"),
        (_unknown_module, "adapts module\\(s\\) this model does not have"),
        (_missing_module, "missing weights for adapted module"),
        (_no_routes, "has no routing vector"),
        (_non_finite, "not a finite"),
    ],
)
def test_bad_expert_files_are_refused_before_anything_changes(tmp_path, edit, message):
    model, folder = _library_and_expert(tmp_path)
    _edit_tensors(folder, edit)
    _edit_config(folder, module_shapes=None)  # as in a plain LoRA folder: the model's own modules decide
    before = _snapshot(model)
    with pytest.raises(ExpertMismatchError, match=message):
        model.add_expert(folder, adapter_name="newcomer")
    assert model.experts == ["expert_0", "expert_1"]
    _assert_same_state(model, before)


@pytest.mark.parametrize("edit", [_unknown_module, _missing_module])
def test_weights_that_disagree_with_the_recorded_shapes_are_refused_without_a_model(tmp_path, edit):
    _, folder = _library_and_expert(tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(ExpertMismatchError, match="module_shapes name different modules"):
        read_expert_folder(folder)


def test_hidden_size_mismatch_is_refused(tmp_path):
    model, folder = _library_and_expert(tmp_path)
    _edit_config(folder, base_hidden_size=64)
    with pytest.raises(ExpertMismatchError, match="hidden size 64"):
        model.add_expert(folder, adapter_name="newcomer")


def test_missing_routes_allowed_with_flag_start_at_zero_with_a_warning(tmp_path):
    model, folder = _library_and_expert(tmp_path)
    _edit_tensors(folder, _no_routes)
    with pytest.warns(UserWarning, match="no routing vectors for 14 of 14 modules"):
        name = model.add_expert(folder, adapter_name="newcomer", allow_missing_routes=True)
    routes = [p for n, p in model.named_parameters() if n.endswith(f"lora_route.{name}")]
    assert len(routes) == 14 and all(torch.count_nonzero(p) == 0 for p in routes)


@pytest.mark.parametrize("bad_name", ["0", "12", "a.b", "", "mlp", "weight", "lora_A", "self_attn", "expert_1", "lora"])
def test_bad_or_duplicate_names_are_refused_everywhere(tmp_path, bad_name):
    model, folder = _library_and_expert(tmp_path)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="expert name|already exists"):
        model.add_expert(folder, adapter_name=bad_name)
    with pytest.raises(ValueError, match="expert name|already exists"):
        model.add_adapter(bad_name, expert_config("llama"))
    assert model.experts == ["expert_0", "expert_1"]
    _assert_same_state(model, before)


def test_failure_while_loading_rolls_back(tmp_path, monkeypatch):
    model, folder = _library_and_expert(tmp_path)
    before = _snapshot(model)

    def explode(self, name, plan):
        raise RuntimeError("disk fell over")

    monkeypatch.setattr(type(model.base_model), "_copy_expert_tensors", explode)
    with pytest.raises(RuntimeError, match="disk fell over"):
        model.add_expert(folder, adapter_name="newcomer")
    assert model.experts == ["expert_0", "expert_1"]
    _assert_same_state(model, before)


def test_pickle_weights_and_non_folders_are_refused(tmp_path):
    model, folder = _library_and_expert(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        model.add_expert(folder, adapter_name="newcomer")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        model.add_expert(tmp_path / "nowhere", adapter_name="newcomer")


def test_save_never_overwrites_a_users_folder_unless_asked(tmp_path):
    model = make_library("llama", n_experts=1)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        model.save_expert("expert_0", target)
    assert (target / "notes.txt").read_text() == "mine"
    model.save_expert("expert_0", target, overwrite=True)
    assert (target / "adapter_config.json").exists() and not (target / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary folder left behind


def test_interrupted_save_leaves_no_half_written_expert(tmp_path, monkeypatch):
    import peft_routing.tuner.expert_folder as expert_folder

    model = make_library("llama", n_experts=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(expert_folder, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_expert("expert_0", tmp_path / "expert")
    assert list(tmp_path.iterdir()) == []


def test_remove_expert_then_route_with_remaining_and_with_none():
    model = make_library("llama", n_experts=2)
    model.set_phase("route")
    model.remove_expert("expert_0")
    assert model.experts == ["expert_1"]
    ids = token_batch()
    model(input_ids=ids)
    model.remove_expert("expert_1")
    base = make_base("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="No expert named"):
        model.remove_expert("expert_1")

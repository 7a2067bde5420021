"""PEFT's own entry points on a routed library: each does the right thing or refuses, never a silent wrong result."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from testing_utils import expert_config, make_base, make_library, token_batch

from peft_routing.tuner.prototype import Prototype


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("phase", ["router", "expert"])
def test_peft_set_adapter_keeps_the_phases_trainable_flags(phase):
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase(phase, "expert_1")
    before = _trainable(model)
    model.set_adapter("expert_1")  # what Trainer's resume path calls
    assert _trainable(model) == before
    kinds = {kind for kind in ("lora_A", "lora_B", "lora_route") if any(f".{kind}." in name for name in before)}
    assert before and all(".expert_1" in name for name in before)
    assert kinds == ({"lora_route"} if phase == "router" else {"lora_A", "lora_B"}), kinds


@pytest.mark.parametrize("phase", ["route", "router"])
@pytest.mark.parametrize("verb", ["merge_and_unload", "merge_adapter"])
def test_merging_a_routed_or_gated_phase_is_refused_and_changes_nothing(phase, verb):
    model = make_library("llama", n_experts=2)
    if phase == "route":
        model.base_model.set_phase("route", top_k=2)
    else:
        model.base_model.set_phase("router", "expert_0")
    before = _logits(model)
    with pytest.raises(ValueError, match="set_phase\\('expert', name\\)"):
        getattr(model, verb)()
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_merging_in_the_expert_phase_is_that_expert_merged():
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase("expert", "expert_1")
    expected = _logits(model)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=token_batch()).logits, expected, rtol=1e-4, atol=1e-5)


def _expert_deltas(model, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """Module path -> sum_j w_j s_j B_j A_j, written out on the raw tensors (the reference for a 'cat' merge)."""
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_route"):
            deltas[path] = sum(w * module.scaling[n] * module.lora_B[n].weight @ module.lora_A[n].weight
                               for n, w in zip(names, weights))
    return deltas


def _base_with(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a fresh base model (the library's seed) with ``deltas`` added to its weights."""
    base = make_base("llama")
    with torch.no_grad():
        for path, delta in deltas.items():
            base.get_submodule(path).weight += delta
        return base(input_ids=token_batch()).logits


def _give_prototypes(model) -> None:
    """Every expert a task prototype, as learn_task gives it (a merge of such experts must still work)."""
    g, hidden = torch.Generator().manual_seed(0), model.base_model.model.config.hidden_size
    for name in model.base_model.experts:
        vector = torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0)
        model.base_model.set_prototype(name, Prototype(vector, 0, -1.0, 8))


@pytest.mark.parametrize("prototypes", [False, True])
def test_a_weighted_merge_is_the_weighted_sum_and_never_joins_the_routed_library(prototypes):
    model = make_library("llama", n_experts=2)
    if prototypes:
        _give_prototypes(model)
    model.base_model.set_phase("route", top_k=2)
    routed = _logits(model)
    with pytest.raises(ValueError, match="set_phase\\('expert', name\\)"):
        model.add_weighted_adapter(["expert_0", "expert_1"], [1.0, 0.5], "merged", combination_type="cat")
    assert "merged" not in model.peft_config
    model.base_model.set_phase("expert", "expert_0")
    model.add_weighted_adapter(["expert_0", "expert_1"], [1.0, 0.5], "merged", combination_type="cat")
    assert model.base_model.merged_adapters == ["merged"]
    assert model.base_model.expert_prototype("merged") is None  # a merge is no task: it has no prototype
    model.base_model.set_phase("expert", "merged")
    expected = _base_with(_expert_deltas(model, ["expert_0", "expert_1"], [1.0, 0.5]))
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-5)
    for phase in (("route",), ("router", "merged"), ("router", "expert_0")):
        with pytest.raises(ValueError, match="add_weighted_adapter"):
            model.base_model.set_phase(*phase)
    assert model.base_model.phase == ("expert", "merged")
    model.delete_adapter("merged")
    assert model.base_model.merged_adapters == []
    model.base_model.set_phase("route")
    torch.testing.assert_close(_logits(model), routed, rtol=0, atol=0)


def test_a_merge_carries_none_of_its_first_experts_own_fields():
    model = make_library("llama", n_experts=2)
    _give_prototypes(model)
    model.base_model.peft_config["expert_0"].expert_name = "expert_0"
    model.base_model.set_phase("expert", "expert_0")
    model.add_weighted_adapter(["expert_0", "expert_1"], [1.0, 1.0], "merged", combination_type="cat")
    merged = model.base_model.peft_config["merged"]
    assert (merged.prototype, merged.prototype_vector, merged.expert_name, merged.module_shapes) == (None,) * 4
    assert model.base_model.expert_prototype("expert_0") is not None  # the expert's own config is untouched


def test_a_merge_under_an_existing_name_or_a_failed_merge_changes_nothing():
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase("expert", "expert_0")
    before = _logits(model)
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["expert_0", "expert_1"], [1.0, 1.0], "expert_1", combination_type="cat")
    with pytest.raises(Exception):  # noqa: B017 - PEFT's own error: TIES without its density
        model.add_weighted_adapter(["expert_0", "expert_1"], [1.0, 1.0], "merged", combination_type="ties")
    assert model.base_model.experts == ["expert_0", "expert_1"] and model.base_model.merged_adapters == []
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    model.base_model.set_phase("route", top_k=2)  # no half-made merge blocks the route phase


def test_peft_delete_adapter_routes_like_a_library_built_without_it():
    model = make_library("llama", n_experts=3)
    model.base_model.set_phase("route", top_k=2)
    kept = {name: get_peft_model_state_dict(model, adapter_name=name) for name in ("expert_0", "expert_2")}
    model.delete_adapter("expert_1")  # PeftModel's verb, not ours
    assert model.base_model.experts == ["expert_0", "expert_2"]
    rebuilt = get_peft_model(make_base("llama"), expert_config("llama"), adapter_name="expert_0")
    rebuilt.add_adapter("expert_2", expert_config("llama"))
    for name, state in kept.items():
        set_peft_model_state_dict(rebuilt, state, adapter_name=name)
    rebuilt.eval()
    rebuilt.base_model.set_phase("route", top_k=2)
    torch.testing.assert_close(_logits(model), _logits(rebuilt), rtol=0, atol=0)


def test_peft_state_dict_holds_every_tensor_of_the_expert_under_peft_keys():
    model = make_library("llama", n_experts=2)
    state = get_peft_model_state_dict(model, adapter_name="expert_1")
    ours = model.base_model.expert_state_dict("expert_1")
    assert set(state) == set(ours)
    for key, tensor in ours.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0)
    assert {key.rpartition(".")[2] for key in state} == {"weight", "lora_route"}


@pytest.mark.parametrize("verb", ["disable_adapter", "disable_adapter_layers"])
@pytest.mark.parametrize("phase", [("route",), ("router", "expert_0"), ("expert", "expert_1")])
def test_disabling_adapters_gives_the_base_model_in_every_phase(verb, phase):
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase(*phase)
    adapted = _logits(model)
    with model.disable_adapter():
        expected = _logits(model)
    fresh = make_base("llama")
    with torch.no_grad():
        torch.testing.assert_close(expected, fresh(input_ids=token_batch()).logits, rtol=0, atol=0)
    if verb == "disable_adapter_layers":
        model.base_model.disable_adapter_layers()
        torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
        model.base_model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)


def test_merge_then_unmerge_in_the_expert_phase_gives_back_the_unmerged_model():
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase("expert", "expert_1")
    expected = _logits(model)
    model.base_model.merge_adapter()
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-5)
    model.base_model.unmerge_adapter()
    model.base_model.set_phase("route", top_k=2)  # routes again: nothing stays merged
    model.base_model.set_phase("expert", "expert_1")
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("phase", [("route",), ("router", "expert_0"), ("expert", "expert_1")])
def test_unload_gives_the_base_model_back_in_every_phase(phase):
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase(*phase)
    base = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=token_batch()).logits,
                                   make_base("llama")(input_ids=token_batch()).logits, rtol=0, atol=0)


def test_peft_set_requires_grad_is_obeyed_and_the_next_phase_sets_its_own_flags():
    model = make_library("llama", n_experts=2)
    model.base_model.set_phase("router", "expert_0")
    model.base_model.set_requires_grad("expert_1", True)
    assert {n for n in _trainable(model) if ".expert_1" in n}
    model.base_model.set_phase("router", "expert_0")  # the same phase again must not trust its earlier walk
    trainable = _trainable(model)
    assert trainable and all(".lora_route.expert_0" in name for name in trainable)


def test_peft_status_and_counting_verbs_describe_the_routed_library():
    model = make_library("llama", n_experts=3)
    model.base_model.set_phase("router", "expert_2")
    routes = [p for n, p in model.named_parameters() if ".lora_route.expert_2" in n]
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in routes)
    assert total == sum(p.numel() for p in model.parameters())
    status = model.get_model_status()
    assert status.available_adapters == model.base_model.experts == ["expert_0", "expert_1", "expert_2"]
    assert status.adapter_model_type == "RoutingLoraModel" and status.enabled
    layers = model.get_layer_status()
    assert len(layers) == len(model.base_model.routing_layers())
    # PeftModel keeps the adapter named at its own set_adapter (set_phase is the tuner's): a config of the library
    assert any(model.active_peft_config is config for config in model.peft_config.values())
    assert model.has_active_enabled_adapter
    assert model.get_base_model() is model.base_model.model and model.modules_to_save is None


def test_prompt_learning_verbs_do_not_apply_and_say_so():
    model = make_library("llama", n_experts=1)
    for verb, args in (("get_prompt", (1,)), ("get_prompt_embedding_to_save", ("expert_0",))):
        with pytest.raises(AttributeError, match="prompt_encoder"):
            getattr(model, verb)(*args)


# Every public verb PEFT gives a PeftModel / LoraModel, with the test that shows what it does on a routed library.
# A PEFT upgrade that adds a verb fails test_every_public_peft_verb_is_covered until someone decides what it does.
COVERED_BY = {
    "active_adapters": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "active_peft_config": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "add_adapter": "test_routing_equations.py::test_route_phase_logits_match_equations_on_saved_tensors",
    "add_weighted_adapter": "test_peft_entry_points.py::"
                            "test_a_weighted_merge_is_the_weighted_sum_and_never_joins_the_routed_library",
    "base_model_torch_dtype": "test_routed_lora.py::test_route_phase_survives_a_dtype_round_trip",
    "create_or_update_model_card": "test_expert_files.py::test_saved_folder_is_a_standard_adapter_folder",
    "delete_adapter": "test_peft_entry_points.py::test_peft_delete_adapter_routes_like_a_library_built_without_it",
    "disable_adapter": "test_peft_entry_points.py::test_disabling_adapters_gives_the_base_model_in_every_phase",
    "disable_adapter_layers": "test_peft_entry_points.py::test_disabling_adapters_gives_the_base_model_in_every_phase",
    "enable_adapter_layers": "test_peft_entry_points.py::test_disabling_adapters_gives_the_base_model_in_every_phase",
    "from_pretrained": "test_hostile_experts.py::test_hostile_folder",
    "generate": "test_prototypes.py::test_generate_with_kv_cache_left_padding_and_beams_matches_no_cache",
    "get_base_model": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "get_layer_status": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "get_model_config": "test_expert_files.py::test_saved_folder_is_a_standard_adapter_folder",
    "get_model_status": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "get_nb_trainable_parameters": "test_peft_entry_points.py::"
                                   "test_peft_status_and_counting_verbs_describe_the_routed_library",
    "get_prompt": "test_peft_entry_points.py::test_prompt_learning_verbs_do_not_apply_and_say_so",
    "get_prompt_embedding_to_save": "test_peft_entry_points.py::test_prompt_learning_verbs_do_not_apply_and_say_so",
    "has_active_enabled_adapter": "test_peft_entry_points.py::"
                                  "test_peft_status_and_counting_verbs_describe_the_routed_library",
    "inject_adapter": "test_hostile_experts.py::test_hostile_folder",
    "load_adapter": "test_hostile_experts.py::test_hostile_folder",
    "merge_adapter": "test_peft_entry_points.py::test_merging_a_routed_or_gated_phase_is_refused_and_changes_nothing",
    "merge_and_unload": "test_peft_entry_points.py::test_merging_in_the_expert_phase_is_that_expert_merged",
    "modules_to_save": "test_peft_entry_points.py::test_peft_status_and_counting_verbs_describe_the_routed_library",
    "prepare_inputs_for_generation": "test_multimodal_and_generate.py::"
                                     "test_route_phase_generate_with_kv_cache_padding_and_mixed_batches",
    "prepare_model_for_gradient_checkpointing": "test_training.py::test_training_options_from_transformers_work",
    "print_trainable_parameters": "test_peft_entry_points.py::"
                                  "test_peft_status_and_counting_verbs_describe_the_routed_library",
    "push_to_hub": "test_hub.py::test_push_then_add_expert_by_repo_id",
    "save_pretrained": "test_expert_stack.py::test_peft_low_cpu_mem_usage_loading_is_stacked_once_the_weights_arrive",
    "set_adapter": "test_peft_entry_points.py::test_peft_set_adapter_keeps_the_phases_trainable_flags",
    "set_requires_grad": "test_peft_entry_points.py::"
                         "test_peft_set_requires_grad_is_obeyed_and_the_next_phase_sets_its_own_flags",
    "subtract_mutated_init": "test_hostile_experts.py::test_hostile_folder",  # PiSSA/OLoRA inits are refused
    "supports_lora_conversion": "test_expert_files.py::test_plain_lora_export_loads_in_stock_peft_without_this_package",
    "tuner_layer_cls": "test_routed_lora.py::test_stack_parameters_are_views_and_rebuilt_after_library_changes",
    "unload": "test_peft_entry_points.py::test_unload_gives_the_base_model_back_in_every_phase",
    "unmerge_adapter": "test_peft_entry_points.py::"
                       "test_merge_then_unmerge_in_the_expert_phase_gives_back_the_unmerged_model",
}


def test_every_public_peft_verb_is_covered():
    import importlib
    import inspect

    from peft import PeftModel, PeftModelForCausalLM
    from peft.tuners.lora import LoraModel

    module_verbs = set(dir(torch.nn.Module))
    public = {name for cls in (PeftModel, PeftModelForCausalLM, LoraModel) for name, _ in inspect.getmembers(cls)
              if not name.startswith("_") and name not in module_verbs}
    public -= {"prefix", "peft_config", "targeted_module_names", "targeted_parameter_names", "target_module_mapping",
               "uses_shared_state"}  # data, not verbs
    assert public == set(COVERED_BY), (sorted(public - set(COVERED_BY)), sorted(set(COVERED_BY) - public))
    for verb, node in COVERED_BY.items():
        file, _, test = node.partition("::")
        assert hasattr(importlib.import_module(file.removesuffix(".py")), test), f"{verb}: {node} does not exist"

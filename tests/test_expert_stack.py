"""The layers' expert stacks follow every library change: new experts are appended into free slots, the stack grows
or is rebuilt when they do not fit, and PEFT's parameters always view the stack and keep their values."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from reference import ExpertTensors, routed_delta, score_margin, token_scores
from testing_utils import expert_config, make_base, make_library, token_batch

from peft_routing.ops import ExpertStack

TOP_K = 2


def _layer(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _expert_tensors(layer, name) -> dict[str, torch.Tensor]:
    return {"A": layer.lora_A[name].weight, "B": layer.lora_B[name].weight, "v": layer.lora_route[name]}


def _copied_tensors(layer, name) -> dict[str, torch.Tensor]:
    """The expert's values now, detached from the stack (which later steps may move)."""
    return {k: t.detach().clone() for k, t in _expert_tensors(layer, name).items()}


def _assert_parameters_view_the_stack(layer, stack: ExpertStack) -> None:
    """Every expert's A, B and routing vector is its slot of the stack (same memory), pad rows are zero."""
    assert stack.names == list(layer.lora_A.keys())
    storages = {t.untyped_storage().data_ptr() for t in (stack.vectors, stack.a, stack.b_t)}
    for j, name in enumerate(stack.names):
        r, tensors = layer.r[name], _expert_tensors(layer, name)
        assert {t.untyped_storage().data_ptr() for t in tensors.values()} <= storages
        assert tensors["A"].data_ptr() == stack.a[j].data_ptr()
        assert tensors["v"].data_ptr() == stack.vectors[j].data_ptr()
        assert tensors["B"].data_ptr() == stack.b_t[j].data_ptr()
        assert torch.equal(stack.a[j, :r], tensors["A"]) and torch.equal(stack.b_t[j, :r].t(), tensors["B"])
        assert not stack.a[j, r:].any() and not stack.b_t[j, r:].any()
        assert stack.scales[j].item() == float(layer.scaling[name])


def _assert_route_output_is_the_reference(layer, seed: int) -> None:
    """The layer's route-phase output against eq. 3-4 written out on PEFT's per-expert parameters, in float64."""
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(seed))
    experts = [ExpertTensors(**_expert_tensors(layer, n), s=float(layer.scaling[n])) for n in layer.lora_A]
    with torch.no_grad():
        got = layer(x).double() - layer.base_layer(x).double()
    for token, row in zip(x, got):
        if score_margin(token_scores(token, experts, "none"), TOP_K) < 1e-4:
            continue  # a near-tie may flip in float32
        want = routed_delta(token, experts, TOP_K, 1.0, "none", "softmax")
        torch.testing.assert_close(row, want, atol=1e-4, rtol=1e-4)


OPERATIONS = st.one_of(
    st.tuples(st.just("add"), st.sampled_from([2, 4, 8])),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(st.just("replace_last"), st.integers(0, 2**16)),  # what PEFT's dtype casts do to a new expert
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.integers(1, 9), operations=st.lists(OPERATIONS, min_size=1, max_size=10))
def test_the_stack_follows_adds_removals_and_replaced_tensors_and_keeps_every_value(start, operations):
    model = make_library("llama", n_experts=start, ranks=[4, 2])
    model.set_phase("route", top_k=TOP_K)
    layer = _layer(model)
    values = {name: _copied_tensors(layer, name) for name in layer.lora_A}
    added = start
    for step, (operation, argument) in enumerate(operations):
        if operation == "add":
            name = f"expert_{added}"
            added += 1
            model.add_adapter(name, expert_config("llama", argument))
            with torch.no_grad():
                layer.lora_route[name].normal_()
            values[name] = _copied_tensors(layer, name)
        elif operation == "remove" and len(values) > 1:
            name = list(values)[argument % len(values)]
            model.remove_expert(name)
            del values[name]
        elif operation == "replace_last":
            name = list(values)[-1]
            fresh = torch.randn(layer.lora_B[name].weight.shape, generator=torch.Generator().manual_seed(argument))
            layer.lora_B[name].weight.data = fresh  # a new tensor: no longer a view of the stack
            values[name]["B"] = fresh.clone()
        _assert_route_output_is_the_reference(layer, seed=step)
        stack = layer.expert_stack()
        _assert_parameters_view_the_stack(layer, stack)
        for name, tensors in values.items():
            for key, value in tensors.items():
                assert torch.equal(_expert_tensors(layer, name)[key], value), (name, key)


def test_adding_an_expert_appends_into_the_free_slots_and_the_stack_doubles_when_full():
    model = make_library("llama", n_experts=3, ranks=[4])
    layer = _layer(model)
    stack = layer.current_expert_stack  # stacked as the experts were added, before any route-phase forward
    assert stack is not None and stack.capacity == 8 and stack.names == ["expert_0", "expert_1", "expert_2"]
    storage = stack.a.untyped_storage().data_ptr()
    for i in range(3, 8):
        model.add_adapter(f"expert_{i}", expert_config("llama", 4))
        assert layer.current_expert_stack is stack  # appended in place
        assert stack.a.untyped_storage().data_ptr() == storage
    model.add_adapter("expert_8", expert_config("llama", 4))
    grown = layer.current_expert_stack
    assert grown is not stack and grown.capacity == 16 and grown.num_experts == 9
    _assert_parameters_view_the_stack(layer, grown)
    model.add_adapter("expert_9", expert_config("llama", 8))  # a larger rank than the slots hold: restacked
    assert layer.current_expert_stack.r_max == 8
    _assert_parameters_view_the_stack(layer, layer.current_expert_stack)


def test_moving_the_model_frees_the_stale_stack():
    model = make_library("llama", n_experts=2)
    layer = _layer(model)
    assert layer.current_expert_stack is not None
    model.to(torch.float64)  # every parameter gets a new tensor
    assert layer.current_expert_stack is None
    model.set_phase("route", top_k=TOP_K)
    _assert_route_output_is_the_reference(layer.to(torch.float32), seed=0)


def test_peft_low_cpu_mem_usage_loading_is_stacked_once_the_weights_arrive(tmp_path):
    """PEFT then creates the new expert's tensors on the meta device and assigns the loaded ones afterwards."""
    model = make_library("llama", n_experts=3)
    model.set_phase("route", top_k=TOP_K)
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_base("llama", 0), tmp_path / "expert_0", adapter_name="expert_0",
                                       low_cpu_mem_usage=True)
    for name in ("expert_1", "expert_2"):
        loaded.load_adapter(tmp_path / name, adapter_name=name, low_cpu_mem_usage=True)
    loaded.set_phase("route", top_k=TOP_K)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    _assert_parameters_view_the_stack(_layer(loaded), _layer(loaded).expert_stack())

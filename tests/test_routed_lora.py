"""Every route-phase strategy equals the per-expert reference loop, and no strategy reads stale stacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import make_library, random_stack, token_batch

from peft_routing import RoutingLinear
from peft_routing.ops import (
    LOOPED_EXPERT_ROWS,
    RoutingSettings,
    route,
    routed_forward,
    routed_lora_delta,
    sorted_layout,
    top_k,
)


def _stack(n, r_max, d_in, d_out, seed, dtype=torch.float32):
    return random_stack(n, r_max, d_in, d_out, seed, dtype, spare_slots=seed % 3)


def _reference(tokens, stack, routing):
    routes = route(tokens, stack.vectors, routing)
    a = [stack.a[j] for j in range(stack.num_experts)]
    b = [stack.b_t[j].t() for j in range(stack.num_experts)]
    return routed_lora_delta(tokens, routes, a, b, stack.scales.tolist()), routes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 64),
    r_max=st.sampled_from([4, 8, 16, 32]),
    d_in=st.sampled_from([4, 12, 13, 36, 64]),  # 13: rows of 52 bytes, which grouped_mm refuses
    d_out=st.sampled_from([4, 7, 20, 44]),
    tokens=st.sampled_from([0, 1, 3, 17, 40]),
    top_k=st.integers(1, 4),
    score_norm=st.sampled_from(["none", "standardize"]),
    mixing=st.sampled_from(["softmax", "sigmoid"]),
    strategy=st.sampled_from(["auto", "torch", "cpu_kernel", "dense", "sorted", "padded", "grouped", "gather"]),
    seed=st.integers(0, 1000),
)
def test_strategies_equal_the_reference_loop(n, r_max, d_in, d_out, tokens, top_k, score_norm, mixing, strategy, seed):
    stack = _stack(n, r_max, d_in, d_out, seed)
    routing = RoutingSettings(top_k=top_k, temperature=0.7, score_norm=score_norm, mixing=mixing)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed + 1))
    want, want_routes = _reference(x, stack, routing)
    base = torch.randn(tokens, d_out)
    got, routes = routed_forward(x, stack, routing, strategy, out=base.clone())
    # the same decision (scores come from different matmuls, so compare where there is no near-tie) ...
    assert torch.equal(routes.expert_ids, want_routes.expert_ids) or tokens == 0 or _has_near_tie(x, stack, routing)
    if torch.equal(routes.expert_ids, want_routes.expert_ids):
        torch.testing.assert_close(got, base + want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_sorted_layout_pads_near_uniform_routing_and_groups_skewed_routing(grouped_mm):
    uniform = [16] * 8  # padding adds no rows
    skewed = [200] + [1] * 7  # padding would move 8 * 200 rows for 207 pairs
    assert sorted_layout(skewed, grouped_mm) == "grouped"
    # with grouped_mm the grouped path always wins (measured); without, padding 128 rows beats looping 8 experts
    assert sorted_layout(uniform, grouped_mm) == ("grouped" if grouped_mm else "padded")
    assert 8 * 16 <= 128 + 8 * LOOPED_EXPERT_ROWS


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["sorted", "padded", "grouped"])
def test_sorted_strategies_in_other_dtypes_equal_the_loop(dtype, strategy):
    # grouped_mm takes 16-bit floats on a CPU but not float64, which loops over the experts instead
    stack = _stack(6, 8, 16, 24, 5, dtype)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    routing = RoutingSettings(top_k=2)
    base = torch.randn(40, 24, generator=torch.Generator().manual_seed(7)).to(dtype)
    got, routes = routed_forward(x, stack, routing, strategy, out=base.clone())
    want, want_routes = routed_forward(x, stack, routing, "loop", out=base.clone())
    assert torch.equal(routes.expert_ids, want_routes.expert_ids)
    tolerance = 1e-9 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(got.double(), want.double(), atol=tolerance * want.abs().max().item(), rtol=tolerance)


def _has_near_tie(x, stack, routing) -> bool:
    from peft_routing.ops import stack_scores

    scores = stack_scores(x, stack, routing.score_norm).sort(dim=-1, descending=True).values
    k = min(routing.top_k, stack.num_experts)
    return k < stack.num_experts and bool(((scores[:, k - 1] - scores[:, k]).abs() < 1e-4).any())


@pytest.mark.parametrize("tokens, top_k", [(20, 1), (1, 1), (1, 2), (2, 2)])  # 1-2 tokens: the decode path
def test_exact_ties_pick_the_same_experts_in_every_strategy(tokens, top_k):
    stack = _stack(6, 4, 8, 8, 0)
    stack.vectors[3].copy_(stack.vectors[1])  # two identical experts' vectors: a tie on every token
    x = torch.randn(tokens, 8)
    routing = RoutingSettings(top_k=top_k)
    strategies = ("cpu_kernel", "dense", "padded", "grouped", "gather", "loop")
    picks = {s: routed_forward(x, stack, routing, s)[1].expert_ids for s in strategies}
    assert all(torch.equal(p, picks["loop"]) for p in picks.values())


def test_decode_path_hands_non_finite_scores_to_the_batched_path():
    stack = _stack(5, 4, 8, 8, 1)
    stack.vectors[2, 0] = float("nan")  # expert 2 scores nan: torch.max picks it, Python's ordering would not
    x = torch.randn(1, 8)
    routing = RoutingSettings(top_k=2)
    got, routes = routed_forward(x, stack, routing, "gather", out=torch.zeros(1, 8))
    want, want_routes = routed_forward(x, stack, routing, "loop", out=torch.zeros(1, 8))
    assert torch.equal(routes.expert_ids, want_routes.expert_ids)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_stack_parameters_are_views_and_rebuilt_after_library_changes():
    model = make_library("llama", n_experts=3, ranks=[4, 8])
    model.set_phase("route", top_k=2)
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    stack = layer.expert_stack()
    # PEFT's parameters share memory with the stack: no second copy of the library
    assert layer.lora_A["expert_1"].weight.untyped_storage().data_ptr() == stack.a.untyped_storage().data_ptr()
    # an in-place edit through PEFT's parameter is seen by the route phase at once
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "expert_0" in getattr(module, "lora_B", {}):
                module.lora_B["expert_0"].weight.zero_()
                module.lora_B["expert_1"].weight.zero_()
                module.lora_B["expert_2"].weight.zero_()
        zeroed = model(input_ids=ids).logits
    assert not torch.allclose(before, zeroed)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(zeroed, model(input_ids=ids).logits)
    model.remove_expert("expert_2")
    assert layer.expert_stack().names == ["expert_0", "expert_1"]


def test_route_phase_survives_a_dtype_round_trip():
    model = make_library("llama", n_experts=2)
    model.set_phase("route", top_k=2)
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.to(torch.float64)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)


def test_standardized_scores_follow_router_training_after_the_stack_was_built():
    model = make_library("llama", n_experts=3, seed=2)
    ids = token_batch()
    model.set_phase("route", top_k=2, score_norm="standardize")
    with torch.no_grad():
        model(input_ids=ids)  # builds the stacks and their standardized vectors
    model.set_phase("router", "expert_1")
    with torch.no_grad():  # a router training step changes the vectors in place (they are views of the stack)
        for name, param in model.named_parameters():
            if name.endswith(".lora_route.expert_1"):
                param.mul_(-3.0).add_(0.5)
    model.set_phase("route")
    with torch.no_grad():
        got = model(input_ids=ids).logits
        for layer in model.modules():
            if isinstance(layer, RoutingLinear):
                layer.drop_expert_stack()  # forgotten: the next forward stacks from scratch, the independent answer
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from([float("-inf"), float("inf"), float("nan"), -1.0, 0.0, 1.0]),
                           min_size=6, max_size=6), min_size=1, max_size=4),
    k=st.integers(1, 4),
)
def test_top_k_orders_ties_and_non_finite_scores_as_written_out(rows, k):
    """NaN first, then larger scores, equal scores by lower index; k distinct experts even on a row of -inf."""
    scores = torch.tensor(rows)
    values, indices = top_k(scores, k)
    for row, got_values, got_indices in zip(rows, values.tolist(), indices.tolist()):
        nan_first = sorted(range(len(row)), key=lambda j: (row[j] == row[j], -row[j] if row[j] == row[j] else 0, j))
        assert got_indices == nan_first[:k]
        assert [str(v) for v in got_values] == [str(row[j]) for j in nan_first[:k]]

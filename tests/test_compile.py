"""torch.compile of the route phase: the whole model traces as one graph (fullgraph=True) on every CPU path, and the
compiled model gives the eager logits."""

from __future__ import annotations

import pytest
import torch
from test_prototypes import _give_prototypes
from testing_utils import make_library, token_batch

from peft_routing.ops import cpu_kernel

STRATEGIES = ["torch"] + (["auto"] if cpu_kernel.ready() else [])  # auto: the CPU kernel, where it builds


def _routed(n_experts: int, strategy: str, **route):
    model = make_library("llama", n_experts=n_experts, seed=n_experts)
    model.set_phase("route", **({"top_k": 2} | route))
    model.set_routing_strategy(strategy)
    return model


def _eager_and_compiled(model, ids: torch.Tensor, backend: str, fullgraph: bool = True):
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)(input_ids=ids).logits
    return eager, compiled


# 4 experts: the dense path; 80 experts x r 4: past DENSE_MAX_COLUMNS (sorted when eager); one token: gather
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("n_experts", "batch", "length"), [(4, 2, 6), (80, 2, 6), (4, 1, 1)])
def test_route_phase_traces_as_one_graph(strategy, n_experts, batch, length):
    model = _routed(n_experts, strategy)
    eager, compiled = _eager_and_compiled(model, token_batch(batch, length), backend="eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["prototype", "token+prototype"])
def test_prototype_routers_compile_with_breaks_and_give_the_eager_logits(router):
    """The prototype routers keep per-sequence state beside the KV cache (Python objects dynamo cannot rebuild), so
    they compile in several graphs, not fullgraph: correct, not yet break-free."""
    model = _routed(4, "torch")
    _give_prototypes(model)
    model.set_phase("route", router=router)
    eager, compiled = _eager_and_compiled(model, token_batch(), backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_route_phase_matches_eager_with_inductor(strategy):
    model = _routed(4, strategy)
    eager, compiled = _eager_and_compiled(model, token_batch(), backend="inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)

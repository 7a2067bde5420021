"""PEFT's own entry points on a routed library: each does the right thing or refuses, never a silent wrong result."""

from __future__ import annotations

import pytest
import torch
from testing_utils import make_library, token_batch


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

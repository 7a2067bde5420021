"""Expert phase == PEFT's own LoRA; router phase == eq. 2; each phase trains exactly its parameters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import ExpertTensors, gated_delta, lora_scaling
from testing_utils import ARCHITECTURES, LLAMA_TARGETS, expert_config, make_base, make_library, token_batch

from peft_routing import RoutingLoraConfig


def _copy_lora_weights(source, target, source_name, target_name):
    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in target.named_parameters():
            if f".{target_name}." in name and ".lora_" in name:
                param.copy_(src[name.replace(f".{target_name}.", f".{source_name}.")])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_expert_phase_equals_peft_lora(arch, use_rslora):
    ours = make_library(arch, n_experts=2, ranks=[4, 8], seed=1, use_rslora=use_rslora)
    targets = ARCHITECTURES[arch][1]
    stock_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=use_rslora,
                              fan_in_fan_out=arch == "gpt2")
    if arch in ("llava", "qwen2_vl"):  # stock LoRA would also adapt the vision tower; compare on the LM only
        stock_config.target_modules = rf".*language_model.*\.({'|'.join(targets)})"
    stock = get_peft_model(make_base(arch, 1), stock_config, adapter_name="expert_1").eval()
    _copy_lora_weights(ours, stock, "expert_1", "expert_1")
    ours.set_phase("expert", "expert_1")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)


def test_router_phase_matches_eq2_on_one_layer():
    model = make_library("llama", n_experts=2, seed=2)
    model.set_phase("router", "expert_1")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expert = ExpertTensors(
        A=layer.lora_A["expert_1"].weight.detach(),
        B=layer.lora_B["expert_1"].weight.detach(),
        v=layer.lora_route["expert_1"].detach(),
        s=lora_scaling(8, 4, False),
    )
    x = torch.randn(5, 32)
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x).double() + torch.stack([gated_delta(u, expert) for u in x])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_each_phase_trains_only_its_parameters():
    model = make_library("llama", n_experts=3, seed=0)
    model.train()
    model.set_phase("expert", "expert_1")
    trainable = _trainable(model)
    assert trainable and all(".expert_1." in n and (".lora_A." in n or ".lora_B." in n) for n in trainable)
    assert len(trainable) == 2 * 2 * len(LLAMA_TARGETS)

    model.set_phase("router", "expert_2")
    trainable = _trainable(model)
    assert trainable and all(n.endswith(".lora_route.expert_2") for n in trainable)
    assert len(trainable) == 2 * len(LLAMA_TARGETS)

    model.set_phase("route")
    assert _trainable(model) == set()


def _expected_trainable(model, phase: str, expert=None) -> set[str]:
    """Written out from the phase's definition, independently of how set_phase gets there."""
    names = {n for n, _ in model.named_parameters()}
    if phase == "expert":
        return {n for n in names if f".{expert}." in n and (".lora_A." in n or ".lora_B." in n)}
    if phase == "router":
        return {n for n in names if n.endswith(f".lora_route.{expert}")}
    return set()


def test_flags_stay_right_when_set_phase_skips_its_walk():
    """set_phase skips the requires_grad walk when nothing changed; PEFT calls and library changes force it."""
    model = make_library("llama", n_experts=3, seed=0)
    model.train()
    steps = [("route", None), ("route", None), ("expert", "expert_0"), ("route", None), ("router", "expert_2"),
             ("router", "expert_2"), ("route", None)]
    for phase, expert in steps:
        if phase == "route":
            model.set_phase("route", top_k=2)
        else:
            model.set_phase(phase, expert)
        assert _trainable(model) == _expected_trainable(model, phase, expert), (phase, expert)
    model.base_model.set_adapter("expert_1")  # PEFT's own call marks expert_1 trainable behind set_phase's back
    model.set_phase("route", top_k=1)
    assert _trainable(model) == set()
    model.add_adapter("expert_3", expert_config("llama"))  # a new adapter arrives trainable from PEFT
    model.set_phase("route")
    assert _trainable(model) == set()
    model.set_phase("expert", "expert_3")
    assert _trainable(model) == _expected_trainable(model, "expert", "expert_3")


def test_router_phase_training_changes_only_the_routing_vectors():
    model = make_library("llama", n_experts=2, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_phase("router", "expert_0")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = token_batch(2, 8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".lora_route.expert_0") for n in changed)


def test_fresh_model_trains_like_peft_lora_and_new_adapters_start_frozen():
    model = get_peft_model(make_base("llama"), expert_config("llama"), adapter_name="coco")
    assert model.phase == ("expert", "coco")
    assert _trainable(model) and all(".coco." in n and ".lora_route." not in n for n in _trainable(model))
    model.add_adapter("snli", expert_config("llama"))
    assert all(".coco." in n for n in _trainable(model))


@pytest.mark.parametrize(
    "phase_args, message",
    [
        (("fly",), "Unknown phase"),
        (("expert", "nope"), "needs one of the experts"),
        (("route", "expert_0"), "do not pass an expert name"),
    ],
)
def test_bad_set_phase_calls_are_refused(phase_args, message):
    model = make_library("llama", n_experts=1)
    with pytest.raises(ValueError, match=message):
        model.set_phase(*phase_args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(temperature=0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(score_norm="l2"), "score_norm"),
        (dict(mixing="max"), "mixing"),
        (dict(use_dora=True), "use_dora"),
    ],
)
def test_invalid_config_values_raise_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        RoutingLoraConfig(target_modules=["q_proj"], **overrides)
    model = make_library("llama", n_experts=1)
    routing_only = {k: v for k, v in overrides.items() if k in ("top_k", "temperature", "score_norm", "mixing")}
    if routing_only:
        with pytest.raises(ValueError, match=message):
            model.set_phase("route", **routing_only)


def test_experts_without_dropout_share_one_identity_and_dropout_still_applies_where_set():
    model = make_library("llama", n_experts=2)
    model.add_adapter("dropped", expert_config("llama", lora_dropout=0.5))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_dropout["expert_0"] is layer.lora_dropout["expert_1"]
    assert isinstance(layer.lora_dropout["dropped"], torch.nn.Dropout) and layer.lora_dropout["dropped"].p == 0.5
    model.set_phase("expert", "dropped")
    model.train()
    ids = token_batch()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    assert not torch.equal(first, model(input_ids=ids).logits)  # dropout draws a new mask each forward
    model.set_phase("expert", "expert_1")
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)

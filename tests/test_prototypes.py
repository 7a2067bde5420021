"""Prototype routers: the pooling and the rule against the formulas written out by hand, the whole route phase of a
model against that reference layer by layer, one pass with a KV cache, and prototypes travelling with experts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from reference import (
    FEATURE_REFERENCES,
    ExpertTensors,
    cosine,
    prototype_rule,
    routed_delta_biased,
)
from testing_utils import make_library, token_batch

from peft_routing.ops import RoutingSettings, cpu_kernel
from peft_routing.ops.dispatch import routed_forward
from peft_routing.ops.prototypes import (
    FEATURES,
    PRIOR_TEMPERATURE,
    PROMPT_FLOOR_SLACK,
    decide,
    prompt_feature,
    similarities,
)
from peft_routing.tuner.prototype import PROTOTYPE_FILE, Prototype, PrototypeError
from peft_routing.tuner.prototype_router import PrototypeRoutingError
from peft_routing.workflow import new_expert_config

RULES = {
    "prototype": dict(router="prototype"),
    "restrict_2": dict(router="token+prototype", prototype_candidates=2, top_k=2),
    "gated": dict(router="token+prototype", prototype_margin=0.05),
    "prior": dict(router="token+prototype", prototype_prior=0.5, top_k=2),
    "fallback": dict(router="prototype", fallback="base"),
    "restrict_fallback": dict(router="token+prototype", prototype_candidates=2, fallback="base"),
    "prompt": dict(router="prototype", prototype_pooling="prompt"),
    "prompt_restrict_fallback": dict(router="token+prototype", prototype_candidates=2, top_k=2, fallback="base",
                                     prototype_pooling="prompt"),
}


def _rule_args(rule: RoutingSettings) -> dict:
    return dict(router=rule.router, candidates=rule.prototype_candidates, margin=rule.prototype_margin,
                prior=rule.prototype_prior, fallback=rule.fallback, prior_temperature=PRIOR_TEMPERATURE)


# ----------------------------------------------------------------------------------------------------- the math
def _left_padded(seed: int, batch: int, width: int, dim: int):
    """(generator, hidden [B, S, d], mask [B, S]) with random left padding; a row may be all padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, width, dim, generator=g)
    pads = torch.randint(0, width + 1, (batch,), generator=g)
    return g, hidden, torch.arange(width).unsqueeze(0) >= pads.unsqueeze(1)


@settings(max_examples=60, deadline=None)
@given(feature=st.sampled_from(sorted(FEATURES)), batch=st.integers(1, 3), width=st.integers(1, 7),
       dim=st.integers(1, 6), split=st.integers(0, 7), seed=st.integers(0, 10_000))
def test_each_feature_matches_its_formula_and_continues_across_chunks(feature, batch, width, dim, split, seed):
    _, hidden, mask = _left_padded(seed, batch, width, dim)
    pool = FEATURES[feature]
    pooled, _ = pool(hidden, mask)
    split = min(split, width)
    first, state = pool(hidden[:, :split], mask[:, :split])
    second, _ = pool(hidden[:, split:], mask[:, split:], state)
    chunked = torch.cat([first, second], dim=1)
    for b in range(batch):
        want = FEATURE_REFERENCES[feature](hidden[b], mask[b].tolist())
        for t, by_hand in enumerate(want):
            expected = torch.tensor(by_hand if by_hand is not None else [0.0] * dim, dtype=torch.float64)
            torch.testing.assert_close(pooled[b, t].double(), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(chunked[b, t].double(), expected, atol=1e-5, rtol=1e-5)


def pooled_by_hand(hidden: torch.Tensor, mask: list[bool], pooling: str,
                   feature: str = "causal_mean") -> list[list[float] | None]:
    """Each position's feature: its prefix's, or (pooling "prompt") the whole row's, i.e. its last prefix's."""
    features = FEATURE_REFERENCES[feature](hidden, mask)
    return features if pooling == "prefix" else [features[-1]] * len(features)


@settings(max_examples=60, deadline=None)
@given(feature=st.sampled_from(sorted(FEATURES)), batch=st.integers(1, 3), width=st.integers(1, 7),
       extra=st.integers(0, 3), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_prompt_feature_is_the_whole_prompts_for_every_position_and_later_chunk(feature, batch, width, extra, dim,
                                                                                seed):
    g, hidden, mask = _left_padded(seed, batch, width, dim)
    pooled, state = prompt_feature(hidden, mask, pooling=feature)
    later, _ = prompt_feature(torch.randn(batch, extra, dim, generator=g), torch.ones(batch, extra, dtype=torch.bool),
                              state, feature)
    for b in range(batch):
        whole = pooled_by_hand(hidden[b], mask[b].tolist(), "prompt", feature)[0]
        expected = torch.tensor(whole if whole is not None else [0.0] * dim, dtype=torch.float64)
        for row in (pooled[b], later[b]):
            for got in row:
                torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(rule=st.sampled_from(sorted(RULES)), tokens=st.integers(1, 6), experts=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_decide_matches_the_rule_written_out(rule, tokens, experts, seed):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(tokens, 8, generator=g)
    prototypes = torch.nn.functional.normalize(torch.randn(experts, 8, generator=g), dim=-1)
    floors = torch.rand(experts, generator=g) * 0.6 - 0.3
    routing = RoutingSettings(**RULES[rule])
    decision = decide(similarities(pooled, prototypes), floors, routing)
    for t in range(tokens):
        bias, keep = prototype_rule(pooled[t].tolist(), prototypes.double().tolist(), floors.tolist(),
                                    **_rule_args(routing))
        torch.testing.assert_close(decision.bias[t].double(), torch.tensor(bias, dtype=torch.float64),
                                   atol=1e-4, rtol=1e-4)
        assert (True if decision.keep is None else bool(decision.keep[t])) == keep


STRATEGIES = ["loop", "dense", "gather", "sorted", "padded", "auto"] + (
    ["cpu_kernel"] if cpu_kernel.enabled() and cpu_kernel.is_built() else [])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("num_tokens", [1, 2, 9])
def test_every_strategy_applies_the_decision(strategy, rule, num_tokens):
    from testing_utils import random_stack

    stack = random_stack(4, 3, 8, 5, seed=num_tokens)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(num_tokens, 8, generator=g)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    floors = torch.full((4,), 0.2)
    routing = RoutingSettings(**RULES[rule]).replace(temperature=0.7)
    decision = decide(similarities(torch.randn(num_tokens, 8, generator=g), prototypes), floors, routing)
    with torch.no_grad():
        got, routes = routed_forward(tokens, stack, routing, strategy, out=torch.zeros(num_tokens, 5),
                                     decision=decision)
    experts = [ExpertTensors(stack.a[j], stack.b_t[j].t(), stack.vectors[j], float(stack.scales[j])) for j in range(4)]
    layer_rule = routing.layer_rule
    for t in range(num_tokens):
        keep = True if decision.keep is None else bool(decision.keep[t])
        want = routed_delta_biased(tokens[t], experts, decision.bias[t].tolist(), keep, layer_rule.top_k,
                                   layer_rule.temperature, layer_rule.score_norm, layer_rule.mixing)
        torch.testing.assert_close(got[t].double(), want, atol=1e-4, rtol=1e-4)
        if not keep:
            assert float(routes.weights[t].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------- the whole model
def _give_prototypes(model, seed: int = 0, floor: float = -1.0, layer: int = 0,
                     prompt_floor: float | None = None, feature: str = "causal_mean") -> None:
    g = torch.Generator().manual_seed(seed)
    hidden = model.base_model.model.config.hidden_size
    for name in model.base_model.experts:
        vector = torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0)
        model.base_model.set_prototype(name, Prototype(vector, layer, floor, 8, feature, prompt_floor=prompt_floor))


def _floor_between_rows(model, ids: torch.Tensor, mask: torch.Tensor, feature: str) -> float:
    """Midway between the rows' best prompt cosines (prototypes at block 0, whose input is the embeddings)."""
    tuner = model.base_model
    embeddings = tuner.model.model.embed_tokens(ids).detach()
    prototypes = [tuner.expert_prototype(n).vector.double().tolist() for n in tuner.experts]
    best = [max(cosine(pooled_by_hand(embeddings[b], mask[b].bool().tolist(), "prompt", feature)[0], p)
                for p in prototypes) for b in range(ids.shape[0])]
    return (min(best) + max(best)) / 2


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_route_phase_matches_the_reference_layer_by_layer(rule, feature):
    model = make_library("llama", 3, ranks=[2, 4])
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    # prefix pooling reads the floor, not the prompt floor
    _give_prototypes(model, floor=0.05, prompt_floor=1.0, feature=feature)
    if RULES[rule].get("prototype_pooling") == "prompt":  # one decision per row: a prompt floor between the rows'
        between = _floor_between_rows(model, ids, mask, feature)  # best, not the floor
        _give_prototypes(model, floor=1.0, prompt_floor=between, feature=feature)
    model.set_phase("route", **RULES[rule])
    tuner = model.base_model
    blocks = tuner.model.model.layers
    captured: dict = {}
    handles = [blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.__setitem__("h", (args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True)]
    calls = []
    for layer in tuner.routing_layers():
        handles.append(layer.register_forward_hook(
            lambda m, args, out: calls.append((m, args[0].detach(), out.detach()))))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    names = tuner.experts
    prototypes = [tuner.expert_prototype(n).vector.double().tolist() for n in names]
    routing = tuner.routing_settings
    prompt_pooling = routing.prototype_pooling == "prompt"
    floors = [getattr(tuner.expert_prototype(n), "prompt_floor" if prompt_pooling else "floor") for n in names]
    rules = []
    for b in range(ids.shape[0]):
        for pooled in pooled_by_hand(captured["h"][b], mask[b].bool().tolist(), routing.prototype_pooling, feature):
            rules.append(prototype_rule(pooled, prototypes, floors, **_rule_args(routing)))
    layer_rule = routing.layer_rule
    kept_out = 0
    for layer, x, out in calls:
        base = layer.base_layer(x)
        experts = [ExpertTensors(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.lora_route[n],
                                 layer.scaling[n]) for n in names]
        for t, u in enumerate(x.reshape(-1, x.shape[-1])):
            bias, keep = rules[t]
            kept_out += not keep
            want = routed_delta_biased(u, experts, bias, keep, layer_rule.top_k, layer_rule.temperature,
                                       layer_rule.score_norm, layer_rule.mixing)
            got = (out - base).reshape(-1, out.shape[-1])[t]
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    if routing.fallback == "base":
        assert 0 < kept_out < len(calls) * len(rules), "the floor should keep some positions out, not all"


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("rule", ["prototype", "restrict_2", "fallback"])
def test_generate_with_kv_cache_left_padding_and_beams_matches_no_cache(rule, feature):
    model = make_library("llama", 3)
    _give_prototypes(model, floor=0.05, feature=feature)
    model.set_phase("route", **RULES[rule])
    ids = token_batch(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for beams in (1, 2):
        with torch.no_grad():
            cached = model.generate(**common, num_beams=beams, use_cache=True)
            uncached = model.generate(**common, num_beams=beams, use_cache=False)
        assert torch.equal(cached, uncached)
    with torch.no_grad():  # logits of a step-by-step decode equal one full forward
        full = model(input_ids=ids, attention_mask=mask).logits
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, cache=first.past_key_values)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1)[mask.bool()], full[mask.bool()],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("beams", [1, 2])
def test_prompt_pooling_generates_what_the_prompts_nearest_expert_alone_generates(beams, feature):
    """REPRO's two passes written out: pick each row's expert from its prompt, then generate with that expert."""
    model = make_library("llama", 3)
    _give_prototypes(model, seed=5, feature=feature)
    tuner = model.base_model
    ids = token_batch(3, 6, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=beams)
    embeddings = tuner.model.model.embed_tokens(ids).detach()  # what enters block 0, the prototype block
    prototypes = [tuner.expert_prototype(n).vector.double().tolist() for n in tuner.experts]
    chosen = []
    for b in range(ids.shape[0]):
        whole = pooled_by_hand(embeddings[b], mask[b].bool().tolist(), "prompt", feature)[0]
        cos = [cosine(whole, p) for p in prototypes]
        chosen.append(tuner.experts[max(range(len(cos)), key=cos.__getitem__)])
    assert len(set(chosen)) > 1, "the rows should pick different experts, or the test shows little"
    with torch.no_grad():
        model.set_phase("route", router="prototype", prototype_pooling="prompt")
        routed = model.generate(**common)
        alone = {}
        for name in set(chosen):
            model.set_phase("expert", name)
            alone[name] = model.generate(**common)
    for b, name in enumerate(chosen):
        assert torch.equal(routed[b], alone[name][b]), f"row {b} (expert {name})"


def test_prompt_positions_make_a_teacher_forced_pass_route_as_generation_does():
    model = make_library("llama", 3)
    _give_prototypes(model, seed=5)
    model.set_phase("route", router="token+prototype", prototype_candidates=2, top_k=2, prototype_pooling="prompt")
    ids = token_batch(2, 9, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    prompt = 6  # the first 6 columns are the prompt, the last 3 the answer
    with torch.no_grad():
        first = model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        rest = model(input_ids=ids[:, prompt:], attention_mask=mask, cache=first.past_key_values)
        generated = torch.cat([first.logits, rest.logits], dim=1)
        with model.base_model.prompt_positions(torch.arange(9).unsqueeze(0).expand(2, -1) < prompt):
            forced = model(input_ids=ids, attention_mask=mask).logits
        whole = model(input_ids=ids, attention_mask=mask).logits  # without it the answer takes part in the choice
    real = mask.bool()
    torch.testing.assert_close(forced[real], generated[real], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(whole[real], generated[real], atol=1e-5), "the answer should have moved the choice"
    with pytest.raises(PrototypeRoutingError, match="one flag per input position"):
        with model.base_model.prompt_positions(torch.ones(2, 3, dtype=torch.bool)), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def test_a_cache_built_with_the_other_pooling_or_feature_is_refused():
    model = make_library("llama", 2)
    _give_prototypes(model)
    ids = token_batch(1, 5)
    with torch.no_grad():
        model.set_phase("route", router="prototype")
        past = model(input_ids=ids, use_cache=True).past_key_values
        model.set_phase("route", router="prototype", prototype_pooling="prompt")
        with pytest.raises(PrototypeRoutingError, match="same router and pooling"):
            model(input_ids=ids[:, :1], cache=past)
        model.set_phase("route", router="prototype")
        past = model(input_ids=ids, use_cache=True).past_key_values
        _give_prototypes(model, feature="last")
        model.set_phase("route", router="prototype")
        with pytest.raises(PrototypeRoutingError, match="same router and pooling"):
            model(input_ids=ids[:, :1], cache=past)


def test_a_cache_the_router_did_not_see_is_refused():
    model = make_library("llama", 2)
    _give_prototypes(model)
    ids = token_batch(1, 5)
    with torch.no_grad():
        model.set_phase("route")
        past = model(input_ids=ids, use_cache=True).past_key_values  # built by the token router
        model.set_phase("route", router="prototype")
        with pytest.raises(PrototypeRoutingError, match="cannot continue this KV cache"):
            model(input_ids=ids[:, :1], cache=past)


def test_router_names_the_experts_without_a_prototype():
    model = make_library("llama", 3)
    model.base_model.set_prototype("expert_0", Prototype(torch.ones(32), 0, 0.0, 4))
    model.set_phase("route", router="prototype")
    with pytest.raises(PrototypeRoutingError, match=r"\['expert_1', 'expert_2'\] have none"):
        model(input_ids=token_batch(1, 4))


def test_a_new_experts_config_does_not_inherit_the_first_experts_prototype():
    """train_expert (and the demo's Seq-FT) add a new expert shaped like the first: without its task prototype, or
    the prototype router would send the first task's prompts to an expert that never learnt it."""
    model = make_library("llama", 2)
    _give_prototypes(model)
    config = new_expert_config(model.base_model)
    assert (config.prototype, config.prototype_vector, config.expert_name, config.module_shapes) == (None,) * 4
    model.add_adapter("new", config)
    assert model.base_model.expert_prototype("new") is None
    assert model.base_model.expert_prototype("expert_0") is not None
    model.set_phase("route", router="prototype")
    with pytest.raises(PrototypeRoutingError, match=r"\['new'\] have none"):
        model(input_ids=token_batch(1, 4))


def test_a_library_adapting_blocks_below_the_prototype_block_is_refused():
    model = make_library("llama", 2)
    _give_prototypes(model, layer=1)  # block 0 is adapted too
    model.set_phase("route", router="prototype")
    with pytest.raises(PrototypeRoutingError, match="below the prototype block 1"):
        model(input_ids=token_batch(1, 4))


@pytest.mark.parametrize("pooling", ["prompt", "prefix"])
def test_the_fallback_reads_the_prompt_floor_under_prompt_pooling_and_the_floor_otherwise(pooling):
    model = make_library("llama", 2)
    ids = token_batch(2, 5)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    outputs = {}
    for floor, prompt_floor in ((1.0, -1.0), (-1.0, 1.0), (1.0, None)):  # a floor of 1: every position to the base
        _give_prototypes(model, floor=floor, prompt_floor=prompt_floor)
        model.set_phase("route", router="prototype", fallback="base", prototype_pooling=pooling)
        with torch.no_grad():
            outputs[floor, prompt_floor] = model(input_ids=ids).logits
    deciding = {"prompt": (-1.0, 1.0), "prefix": (1.0, -1.0)}[pooling]  # the floor that sends all to the base
    for key, logits in outputs.items():
        all_base = key == deciding or key == (1.0, None)  # an expert saved without a prompt floor uses the floor
        assert torch.equal(logits, base) == all_base, key


def test_token_router_is_unchanged_by_prototypes():
    model = make_library("llama", 3)
    ids = token_batch(2, 5)
    model.set_phase("route", top_k=2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _give_prototypes(model)
        model.set_phase("route", router="token")
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


# --------------------------------------------------------------------------------------------- on disk and back
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("plain", [False, True])
def test_prototypes_round_trip_through_every_way_in(tmp_path, plain, feature):
    from testing_utils import make_base

    model = make_library("llama", 2)
    _give_prototypes(model, floor=0.25, prompt_floor=0.5, feature=feature)
    want = {n: model.base_model.expert_prototype(n) for n in model.base_model.experts}
    for name in want:
        model.save_expert(name, tmp_path / name, as_plain_lora=plain)
        assert (tmp_path / name / PROTOTYPE_FILE).is_file()
    libraries = [make_library("llama", 1, seed=1)]
    for library in libraries:
        library.add_expert(tmp_path / "expert_0", adapter_name="first")
        library.add_expert(tmp_path / "expert_1", adapter_name="second")
    if not plain:  # PEFT's own entry points read a plain-LoRA folder as stock LoRA, without routing
        loaded = PeftModel.from_pretrained(make_base("llama"), tmp_path / "expert_0", adapter_name="expert_0")
        loaded.load_adapter(str(tmp_path / "expert_1"), adapter_name="expert_1")
        libraries.append(loaded)
    for library in libraries:
        names = ["first", "second"] if "first" in library.base_model.experts else list(want)
        for name, prototype in zip(names, want.values()):
            got = library.base_model.expert_prototype(name)
            assert got.fields() == prototype.fields()
            assert torch.equal(got.vector, prototype.vector)


def _broken(folder, how: str) -> None:
    import json

    from safetensors.torch import save_file

    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if how == "nan":
        save_file({"prototype": torch.full((32,), math.nan)}, folder / PROTOTYPE_FILE)
    elif how == "width":
        save_file({"prototype": torch.ones(31)}, folder / PROTOTYPE_FILE)
    elif how == "int":
        save_file({"prototype": torch.ones(32, dtype=torch.int32)}, folder / PROTOTYPE_FILE)
    elif how == "extra_key":
        save_file({"prototype": torch.ones(32), "x": torch.ones(1)}, folder / PROTOTYPE_FILE)
    elif how == "no_file":
        (folder / PROTOTYPE_FILE).unlink()
    elif how == "layer":
        config["prototype"]["layer"] = 7
    elif how == "floor":
        config["prototype"]["floor"] = 3.0
    elif how == "prompt_floor":
        config["prototype"]["prompt_floor"] = "0.9"
    elif how == "fields":
        config["prototype"] = {"layer": 0}
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("how", ["nan", "width", "int", "extra_key", "no_file", "layer", "floor", "prompt_floor",
                                 "fields"])
def test_bad_prototypes_are_refused_and_the_model_is_unchanged(tmp_path, how):
    source = make_library("llama", 2)
    _give_prototypes(source)
    source.save_expert("expert_1", tmp_path / "bad")
    _broken(tmp_path / "bad", how)
    model = make_library("llama", 1, seed=1)
    ids = token_batch(1, 5)
    model.set_phase("route")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    errors = (PrototypeError, FileNotFoundError)
    with pytest.raises(errors):
        model.add_expert(tmp_path / "bad")
    assert model.base_model.experts == ["expert_0"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("feature, layer", [("causal_mean", 0), ("last", 1)])
def test_compute_prototype_is_the_mean_prompt_feature_and_learn_task_computes_one(feature, layer):
    from peft import get_peft_model
    from testing_utils import expert_config, task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing import compute_prototype, learn_task, load_examples
    from peft_routing.workflow import ChatCollator

    tokenizer = tiny_chat_tokenizer()
    model = get_peft_model(tiny_chat_llama(), expert_config("llama"), adapter_name="upper")
    records = task_records("UP", "yes", n=6)
    with pytest.warns(UserWarning, match="only 6 examples"):
        prototype = compute_prototype(model, "upper", records, tokenizer, layer=layer, pooling=feature)
    collator = ChatCollator(tokenizer)
    features, seen = [], []
    block = model.base_model.model.model.layers[layer]  # the block input itself, not transformers' hidden_states
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"])[0]), with_kwargs=True)
    with torch.no_grad(), model.disable_adapter():
        for example in load_examples(records):
            batch = collator.prompts([example])
            model(**batch)
            hidden = seen.pop()
            last = FEATURE_REFERENCES[feature](hidden, batch["attention_mask"][0].bool().tolist())[-1]
            norm = math.sqrt(sum(x * x for x in last))
            features.append([x / norm for x in last])
    handle.remove()
    mean = [sum(column) / len(features) for column in zip(*features)]
    norm = math.sqrt(sum(x * x for x in mean))
    reference = [x / norm for x in mean]
    torch.testing.assert_close(prototype.vector.double(), torch.tensor(reference, dtype=torch.float64),
                               atol=1e-5, rtol=1e-4)
    farthest = max(1.0 - sum(a * b for a, b in zip(feature, reference)) for feature in features)
    assert prototype.prompt_floor == pytest.approx(1.0 - PROMPT_FLOOR_SLACK * farthest, abs=1e-5)
    assert (prototype.layer, prototype.pooling, prototype.examples) == (layer, feature, 6)
    assert -1 <= prototype.floor <= 1
    if feature == "causal_mean":
        learn_task(model, "lower", task_records("lo", "no", n=6), tokenizer, expert_args=dict(max_steps=1),
                   router_args=dict(max_steps=1, per_device_train_batch_size=2))
        assert model.base_model.expert_prototype("lower").examples == 6


def test_compute_prototype_defaults_to_the_last_position_above_block_0_and_the_mean_at_it():
    from peft import get_peft_model
    from testing_utils import expert_config, task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing import compute_prototype
    from peft_routing.workflow.prototypes import DEFAULT_FEATURE

    model = get_peft_model(tiny_chat_llama(), expert_config("llama"), adapter_name="upper")
    records = task_records("UP", "yes", n=16)
    assert compute_prototype(model, "upper", records, tiny_chat_tokenizer(), layer=1).pooling == DEFAULT_FEATURE
    assert compute_prototype(model, "upper", records, tiny_chat_tokenizer()).pooling == "causal_mean"  # block 0


def test_compute_prototype_refuses_the_last_feature_at_block_0_and_unknown_features():
    from peft import get_peft_model
    from testing_utils import expert_config, task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing import compute_prototype

    model = get_peft_model(tiny_chat_llama(), expert_config("llama"), adapter_name="upper")
    records = task_records("UP", "yes", n=16)
    with pytest.raises(ValueError, match="token embedding"):
        compute_prototype(model, "upper", records, tiny_chat_tokenizer(), pooling="last")  # block 0 is adapted
    with pytest.raises(ValueError, match="pooling must be one of"):
        compute_prototype(model, "upper", records, tiny_chat_tokenizer(), pooling="max")
    assert model.base_model.expert_prototype("upper") is None


def test_a_library_whose_prototypes_pool_different_features_is_refused():
    model = make_library("llama", 2)
    _give_prototypes(model)
    prototype = model.base_model.expert_prototype("expert_1")
    prototype.pooling = "last"
    model.base_model.set_prototype("expert_1", prototype)
    model.set_phase("route", router="prototype")
    with pytest.raises(PrototypeRoutingError, match="pool different features"):
        model(input_ids=token_batch(1, 4))


def test_own_expert_share_counts_each_kind_of_position_and_the_base_fallback():
    from peft import get_peft_model
    from testing_utils import expert_config, task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing import compute_prototype
    from peft_routing.workflow import own_expert_share, routing_shares
    from peft_routing.workflow.diagnostics import BASE_COLUMN, _position_kinds

    ids = torch.tensor([5, 9, 9, 7, 8, 3])
    labels = torch.tensor([-100, -100, -100, -100, 8, 3])
    assert _position_kinds(ids, labels, image_token_id=9).tolist() == [1, 0, 0, 2, 2, 1]
    tokenizer = tiny_chat_tokenizer()
    model = get_peft_model(tiny_chat_llama(), expert_config("llama"), adapter_name="upper")
    examples = task_records("UP", "yes", n=4)
    compute_prototype(model, "upper", examples, tokenizer)
    from peft_routing import load_examples

    model.set_phase("route", router="prototype")
    assert own_expert_share(model, tokenizer, load_examples(examples), "upper") == {"question": 100.0, "answer": 100.0}
    prototype = model.base_model.expert_prototype("upper")
    prototype.floor = 1.0  # nothing is that close: every position falls back to the base model
    model.base_model.set_prototype("upper", prototype)
    model.set_phase("route", fallback="base")
    assert own_expert_share(model, tokenizer, load_examples(examples), "upper") == {"question": 0.0, "answer": 0.0}
    shares = routing_shares(model, tokenizer, load_examples(examples))
    assert shares.experts == ["upper", BASE_COLUMN] and torch.all(shares.shares[:, 1] == 1)


def test_compute_prototype_warns_only_when_its_floors_rest_on_few_examples():
    import warnings

    from peft import get_peft_model
    from testing_utils import expert_config, task_records, tiny_chat_llama, tiny_chat_tokenizer

    from peft_routing import compute_prototype
    from peft_routing.workflow.prototypes import FEW_EXAMPLES

    tokenizer = tiny_chat_tokenizer()
    model = get_peft_model(tiny_chat_llama(), expert_config("llama"), adapter_name="upper")
    with pytest.warns(UserWarning, match=f"only {FEW_EXAMPLES - 1} examples"):
        compute_prototype(model, "upper", task_records("UP", "yes", n=FEW_EXAMPLES - 1), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prototype = compute_prototype(model, "upper", task_records("UP", "yes", n=FEW_EXAMPLES), tokenizer)
    assert prototype.examples == FEW_EXAMPLES

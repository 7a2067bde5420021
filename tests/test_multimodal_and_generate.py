"""Multimodal models adapt only their language model; generate() works in the route phase."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from testing_utils import expert_config, make_base, make_library, randomize_routes, token_batch

from peft_routing import RoutingLinear


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vision_tower_and_projector_stay_untouched(arch):
    # CLIP's attention also has q_proj/k_proj/v_proj: their names match target_modules but must not be adapted.
    targets = ["q_proj", "k_proj", "v_proj", "fc1", "fc2", "qkv", "proj", "linear_1", "linear_2", "down_proj"]
    model = get_peft_model(make_base(arch), expert_config(arch, target_modules=targets), adapter_name="coco")
    adapted = [n for n, m in model.named_modules() if isinstance(m, RoutingLinear)]
    assert adapted and all(".language_model." in n for n in adapted)
    vision = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." not in n]
    assert any("vision_tower" in n or "visual" in n for n in vision)


def test_language_model_only_can_be_turned_off():
    config = expert_config("llava", target_modules=["q_proj"], language_model_only=False)
    model = get_peft_model(make_base("llava"), config, adapter_name="coco")
    adapted = [n for n, m in model.named_modules() if isinstance(m, RoutingLinear)]
    assert any("vision_tower" in n for n in adapted) and any("language_model" in n for n in adapted)


def _generate(model, ids, mask, use_cache):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


def test_route_phase_generate_with_kv_cache_padding_and_mixed_batches():
    model = make_library("llama", n_experts=4, seed=11)
    randomize_routes(model, scale=3.0, seed=11)
    model.set_phase("route", top_k=2)
    rows = [token_batch(1, 7, seed=1)[0], token_batch(1, 4, seed=2)[0]]
    # left padding, as for decoder-only batched generation
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, -len(row):], mask[i, -len(row):] = row, 1
    with torch.no_grad():
        cached = _generate(model, ids, mask, use_cache=True)
        uncached = _generate(model, ids, mask, use_cache=False)
        singles = [_generate(model, r[None], torch.ones(1, len(r), dtype=torch.long), True)[0] for r in rows]
    assert torch.equal(cached, uncached)
    for i, single in enumerate(singles):
        assert torch.equal(cached[i, -6:], single[-6:])


def test_rows_of_one_batch_use_different_experts():
    model = make_library("llama", n_experts=4, seed=3)
    randomize_routes(model, scale=3.0, seed=3)
    model.set_phase("route", top_k=1)
    chosen = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: chosen.append(i[0]))
    with torch.no_grad():
        model(input_ids=token_batch(2, 8))
    hook.remove()
    vectors = torch.stack([layer.lora_route[n] for n in layer.expert_names])
    picks = (chosen[0].reshape(-1, 32) @ vectors.t()).argmax(-1)
    assert len(set(picks.tolist())) > 1

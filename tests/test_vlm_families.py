"""Every VLM family transformers builds tiny: only the language model is adapted, and the route phase runs with and
without images (one expert routed at top-1 is exactly that expert's plain LoRA)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from testing_utils import randomize_routes
from tiny_vlms import FAMILIES, build_tiny_vlm
from transformers import PretrainedConfig

from peft_routing import RoutingLinear, RoutingLoraConfig


def _config(**overrides) -> RoutingLoraConfig:
    values = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return RoutingLoraConfig(**(values | overrides))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + ".")


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_model_is_adapted(family):
    tiny = build_tiny_vlm(family)
    language_linears = {path for path, module in tiny.model.named_modules()
                        if isinstance(module, torch.nn.Linear) and _inside(path, tiny.language_model_path)}
    model = get_peft_model(tiny.model, _config(), adapter_name="task")
    adapted = {path.removeprefix("base_model.model.") for path, module in model.named_modules()
               if isinstance(module, RoutingLinear)}
    assert adapted == language_linears, sorted(adapted ^ language_linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_turning_the_filter_off_adapts_the_vision_side_too(family):
    tiny = build_tiny_vlm(family)
    model = get_peft_model(tiny.model, _config(language_model_only=False), adapter_name="task")
    adapted = [path.removeprefix("base_model.model.") for path, module in model.named_modules()
               if isinstance(module, RoutingLinear)]
    assert any(_inside(path, other) for path in adapted for other in tiny.non_language_paths)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_phase_with_and_without_images(family):
    tiny = build_tiny_vlm(family)
    base = {kind: _logits(tiny.model, inputs) for kind, inputs in (("image", tiny.with_image),
                                                                 ("text", tiny.text_only))}
    model = get_peft_model(tiny.model, _config(), adapter_name="task").eval()
    randomize_routes(model)
    model.base_model.set_phase("expert", "task")
    alone = {"image": _logits(model, tiny.with_image), "text": _logits(model, tiny.text_only)}
    model.base_model.set_phase("route", top_k=1)
    for kind, inputs in (("image", tiny.with_image), ("text", tiny.text_only)):
        routed = _logits(model, inputs)
        torch.testing.assert_close(routed, alone[kind], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(routed, base[kind])
    model.add_adapter("other", _config())
    randomize_routes(model, seed=1)
    model.base_model.set_phase("route", top_k=2)
    for inputs in (tiny.with_image, tiny.text_only):
        assert torch.isfinite(_logits(model, inputs)).all()


def test_a_multimodal_model_whose_language_model_cannot_be_found_is_refused_not_adapted_whole():
    tiny = build_tiny_vlm("llava")
    # hide the language model from every way of finding it: a renamed attribute, a config of another class
    inner = tiny.model.model
    hidden = inner.language_model
    del inner.language_model
    inner.add_module("decoder_stack", hidden)
    hidden.config = PretrainedConfig()
    inner.get_decoder = lambda: None
    tiny.model.get_decoder = lambda: None
    with pytest.raises(ValueError, match="language_model_only=False"):
        get_peft_model(tiny.model, _config(), adapter_name="task")

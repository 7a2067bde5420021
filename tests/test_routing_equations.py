"""Route-phase outputs against the equations written out by hand (tests/reference.py) on the raw tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from reference import ExpertTensors, lora_scaling, routed_delta, score_margin, token_scores
from safetensors.torch import load_file
from testing_utils import ARCHITECTURES, VOCAB, make_base, make_library, token_batch
from torch import nn

from peft_routing import RoutingLoraConfig


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layer_library(d_in, d_out, ranks, use_rslora, dtype, seed):
    torch.manual_seed(seed)
    net = OneLayer(d_in, d_out).to(dtype)
    configs = [
        RoutingLoraConfig(r=r, lora_alpha=3, target_modules=["proj"], init_lora_weights=False, use_rslora=use_rslora)
        for r in ranks
    ]
    model = get_peft_model(net, configs[0], adapter_name="e0")
    for i, config in enumerate(configs[1:], start=1):
        model.add_adapter(f"e{i}", config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_route." in name:
                param.copy_(torch.randn_like(param))
    return model


def _layer_experts(model, names, use_rslora) -> list[ExpertTensors]:
    layer = model.base_model.model.proj
    return [
        ExpertTensors(
            A=layer.lora_A[n].weight.detach(),
            B=layer.lora_B[n].weight.detach(),
            v=layer.lora_route[n].detach(),
            s=lora_scaling(3, layer.r[n], use_rslora),
        )
        for n in names
    ]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_in=st.integers(2, 24),
    d_out=st.integers(1, 20),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=6),
    tokens=st.integers(1, 7),
    top_k=st.integers(1, 4),
    temperature=st.sampled_from([0.25, 1.0, 3.0]),
    score_norm=st.sampled_from(["none", "standardize"]),
    mixing=st.sampled_from(["softmax", "sigmoid"]),
    use_rslora=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    strategy=st.sampled_from(["auto", "dense", "padded", "grouped", "gather", "loop"]),
    seed=st.integers(0, 2**16),
)
def test_route_phase_layer_matches_equations(
    d_in, d_out, ranks, tokens, top_k, temperature, score_norm, mixing, use_rslora, dtype, strategy, seed
):
    model = _layer_library(d_in, d_out, ranks, use_rslora, dtype, seed)
    model.set_phase("route", top_k=top_k, temperature=temperature, score_norm=score_norm, mixing=mixing)
    model.set_routing_strategy(strategy)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed)).to(dtype)
    experts = _layer_experts(model, [f"e{i}" for i in range(len(ranks))], use_rslora)
    # Inputs reach the (float32) adapters as float32; a near-tie may legitimately pick either expert.
    u_rows = x.float()
    for u in u_rows:
        assume(score_margin(token_scores(u, experts, score_norm), top_k) > 1e-3)

    with torch.no_grad():
        got = model(x)
        base = model.base_model.model.proj.base_layer(x)
    want = torch.stack([routed_delta(u, experts, top_k, temperature, score_norm, mixing) for u in u_rows])
    want = base.double() + want
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), **tol)


def test_zero_experts_is_the_base_model():
    model = _layer_library(8, 5, [4], False, torch.float32, 0)
    model.remove_expert("e0")
    assert model.experts == []
    model.set_phase("route")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.base_model.model.proj.base_layer(x), rtol=0, atol=0)


def test_top_k_larger_than_library_uses_every_expert():
    model = _layer_library(8, 5, [2, 3, 4], False, torch.float32, 1)
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.set_phase("route", top_k=3)
        all_three = model(x)
        model.set_phase("route", top_k=50)
        capped = model(x)
    torch.testing.assert_close(capped, all_three, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- whole models
ROUTE_SETTINGS = [
    dict(top_k=1, temperature=1.0, score_norm="none", mixing="softmax"),
    dict(top_k=2, temperature=0.5, score_norm="standardize", mixing="softmax"),
    dict(top_k=3, temperature=1.0, score_norm="none", mixing="sigmoid"),
    dict(top_k=4, temperature=2.0, score_norm="standardize", mixing="sigmoid"),
]


def _saved_experts(model, directory) -> dict[str, dict[str, ExpertTensors]]:
    """Save every expert, then read the files back with safetensors alone: module path -> expert -> tensors."""
    by_module: dict[str, dict[str, ExpertTensors]] = {}
    for name in model.experts:
        folder = model.save_expert(name, directory / name)
        config = RoutingLoraConfig.from_pretrained(str(folder))
        tensors = load_file(folder / "adapter_model.safetensors")
        paths = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
        for path in paths:
            key = f"base_model.model.{path}"
            A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            s = lora_scaling(config.lora_alpha, A.shape[0], config.use_rslora)
            by_module.setdefault(path, {})[name] = ExpertTensors(A, B, tensors[f"{key}.lora_route"], s)
    return by_module


def _reference_model(arch, seed, by_module, route_settings, dtype):
    """The plain base model with a hook on each adapted module adding the hand-written routed delta."""
    base = make_base(arch, seed).to(dtype)
    modules = dict(base.named_modules())

    def hook_for(experts: list[ExpertTensors]):
        def hook(module, inputs, output):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            delta = torch.stack([routed_delta(u, experts, **route_settings) for u in rows])
            return output + delta.reshape(*output.shape[:-1], -1).to(output.dtype)

        return hook

    for path, experts in by_module.items():
        modules[path].register_forward_hook(hook_for(list(experts.values())))
    return base


def _model_inputs(arch):
    ids = token_batch(2, 6)
    if arch == "llava":
        ids[:, 1:5] = VOCAB - 1  # 4 image patches of the 16x16 image
        return dict(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    return dict(input_ids=ids)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("strategy", ["auto", "padded", "grouped"])
def test_route_phase_logits_match_equations_on_saved_tensors(arch, strategy, tmp_path):
    seed = 7
    model = make_library(arch, n_experts=4, ranks=[2, 4, 8], seed=seed)
    model.set_routing_strategy(strategy)
    by_module = _saved_experts(model, tmp_path)
    inputs = _model_inputs(arch)
    for route_settings in ROUTE_SETTINGS:
        model.set_phase("route", **route_settings)
        reference = _reference_model(arch, seed, by_module, route_settings, torch.float32)
        with torch.no_grad():
            got = model(**inputs).logits
            want = reference(**inputs).logits
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4, msg=f"{arch} {route_settings}")


def test_route_phase_logits_match_equations_in_bfloat16(tmp_path):
    seed = 3
    model = make_library("llama", n_experts=3, ranks=[4, 8], seed=seed)
    by_module = _saved_experts(model, tmp_path)
    model = model.to(torch.bfloat16)
    for module in model.modules():  # adapters stay float32 as PEFT's autocast keeps them
        if hasattr(module, "lora_route"):
            for container in (module.lora_A, module.lora_B):
                container.float()
            module.lora_route.float()
    route_settings = dict(top_k=2, temperature=1.0, score_norm="standardize", mixing="softmax")
    model.set_phase("route", **route_settings)
    reference = _reference_model("llama", seed, by_module, route_settings, torch.bfloat16)
    ids = token_batch(2, 6)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        want = reference(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)

"""The route phase on the Triton kernels (``peft_routing.kernels``), for CUDA tensors.

The kernels take plain tensors; this module hands them the stack's slots and, for PHATGOOSE scores, tokens and
vectors standardised here in float32 whatever the model's dtype (in half precision the standardisation itself would
move near-tie decisions).
"""

from __future__ import annotations

import math

import torch

from .expert_stack import ExpertStack
from .routing import Routes, standardize
from .settings import RoutingSettings


def applies(tokens: torch.Tensor, stack: ExpertStack, k: int) -> bool:
    """CUDA tensors, Triton installed, and a library the kernels take.

    Args:
        tokens: [T, d_in] layer inputs.
        stack: the layer's experts.
        k: experts per token.
    """
    if not tokens.is_cuda:
        return False
    try:
        from ..kernels import launch
    except ImportError:  # triton not installed
        return False
    return launch.supports(stack.num_experts, k, stack.r_max)


def routed_forward(tokens: torch.Tensor, stack: ExpertStack, settings: RoutingSettings, out: torch.Tensor,
                   dense: bool) -> tuple[torch.Tensor, Routes]:
    """``dispatch.routed_forward`` on the kernels: ``out`` += the routed LoRA, and the routes.

    Args:
        tokens: [T, d_in] layer inputs, in the stack's dtype.
        stack: the layer's experts.
        settings: the routing rule.
        out: [T, d_out] added into, in place.
        dense: the small-library path of the kernels (no sorting).
    """
    from ..kernels import launch

    if not launch.supports(stack.num_experts, settings.top_k, stack.r_max):
        raise ValueError(f"The Triton kernels support up to {launch.MAX_EXPERTS} experts, top_k <= "
                         f"{launch.MAX_TOP_K} and r <= {launch.MAX_RANK}; use the PyTorch path "
                         "(PEFT_ROUTING_BACKEND=torch).")
    tokens = tokens.contiguous()
    route_tokens, route_vectors, scale = tokens, stack.vectors, 1.0
    if settings.score_norm == "standardize":
        route_tokens, route_vectors = standardize(tokens.float()), standardize(stack.vectors.float())
        scale = 1.0 / math.sqrt(tokens.shape[-1])
    ids, weights = launch.triton_routed_lora_(
        out, tokens, route_tokens, route_vectors.contiguous(), stack.a, stack.b_t, stack.scales, settings.top_k,
        float(settings.temperature), settings.mixing == "sigmoid", scale, dense)
    return out, Routes(expert_ids=ids, weights=weights)

"""The route phase's math on plain tensors: torch only, never PEFT or transformers.

``settings`` (the routing rule), ``routing`` (the equations, the reference), ``expert_stack`` (one layer's experts
side by side), ``strategies`` (PyTorch paths), ``cpu_kernel`` and ``triton_path`` (compiled paths) and ``dispatch``
(which path runs a call).
"""

from .dispatch import STRATEGIES, choose_strategy, routed_forward
from .expert_stack import ExpertStack
from .routing import Routes, route, route_scores, routed_lora_delta, select_experts, standardize, top_k
from .settings import MIXINGS, RECOMMENDED_ROUTER, SCORE_NORMS, RoutingSettings, check_routing_fields
from .strategies import LOOPED_EXPERT_ROWS, sorted_layout, stack_scores

__all__ = [
    "LOOPED_EXPERT_ROWS",
    "MIXINGS",
    "RECOMMENDED_ROUTER",
    "SCORE_NORMS",
    "STRATEGIES",
    "ExpertStack",
    "Routes",
    "RoutingSettings",
    "check_routing_fields",
    "choose_strategy",
    "route",
    "route_scores",
    "routed_forward",
    "routed_lora_delta",
    "select_experts",
    "sorted_layout",
    "stack_scores",
    "standardize",
    "top_k",
]

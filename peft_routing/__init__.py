"""peft-routing: a growing library of LoRA experts, routed per token, as a Hugging Face PEFT adapter type.

``import peft_routing`` registers the ``ROUTING_LORA`` adapter type, after which ``get_peft_model(model,
RoutingLoraConfig(...))`` and ``PeftModel.from_pretrained(model, expert_folder)`` work as for any PEFT method.
"""

from .registration import register as _register

_register()

from .compat import ExpertMismatchError  # noqa: E402
from .config import RoutingLoraConfig, RoutingSettings  # noqa: E402
from .layer import RoutingLinear  # noqa: E402
from .model import RoutingLoraModel  # noqa: E402
from .routing import route, route_scores, routed_lora_delta, select_experts, standardize  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ExpertMismatchError",
    "RoutingLinear",
    "RoutingLoraConfig",
    "RoutingLoraModel",
    "RoutingSettings",
    "route",
    "route_scores",
    "routed_lora_delta",
    "select_experts",
    "standardize",
]

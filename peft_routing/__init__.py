"""peft-routing: a growing library of LoRA experts, routed per token, as a Hugging Face PEFT adapter type.

``import peft_routing`` registers the ``ROUTING_LORA`` adapter type, after which ``get_peft_model(model,
RoutingLoraConfig(...))`` and ``PeftModel.from_pretrained(model, expert_folder)`` work as for any PEFT method.

The package is in wings whose imports point one way, ``kernels <- ops <- tuner <- workflow <- demo <- cli``, with
``io`` a leaf any wing may use. The names below are the public API; the workflow's (training, evaluation, the
library directory) load on first use, so that ``import peft_routing`` does not import transformers' Trainer.
"""

import importlib

from .ops import (
    RECOMMENDED_ROUTER,
    RoutingSettings,
    route,
    route_scores,
    routed_lora_delta,
    select_experts,
    standardize,
)
from .tuner import (
    LLAMA_PROJECTIONS,
    ExpertMismatchError,
    RoutingLinear,
    RoutingLoraConfig,
    RoutingLoraModel,
    register,
)

register()

__version__ = "0.1.0"

_LAZY = {name: "peft_routing.workflow" for name in (
    "ChatCollator", "ChatExample", "DataError", "ExpertLibrary", "LibraryError", "answer_accuracy",
    "choice_accuracy", "compute_prototype", "learn_task", "load_examples", "plot_routing", "routing_shares",
    "train_expert", "train_router",
)}
_LAZY["run_demo"] = "peft_routing.demo"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_routing' has no attribute {name!r}")


__all__ = [
    "LLAMA_PROJECTIONS",
    "ExpertMismatchError",
    "RoutingLinear",
    "RoutingLoraConfig",
    "RoutingLoraModel",
    "RECOMMENDED_ROUTER",
    "RoutingSettings",
    "route",
    "route_scores",
    "routed_lora_delta",
    "select_experts",
    "standardize",
    *_LAZY,
]

"""Makes the routing-LoRA adapter type known to PEFT, so that after ``import peft_routing`` ``get_peft_model`` and
``PeftModel.from_pretrained`` resolve ``"ROUTING_LORA"`` like any built-in type."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import RoutingLoraConfig
from .model import RoutingLoraModel
from .peft_type import PEFT_TYPE_NAME, routing_lora_peft_type


def register() -> None:
    """Register ``RoutingLoraConfig``/``RoutingLoraModel`` with PEFT's own ``register_peft_method``; idempotent."""
    if routing_lora_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    # Same prefix as LoRA (AdaLoRA does the same): every parameter we add is named "lora_*", so PEFT's missing-key
    # report on load covers the routing vectors too.
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=RoutingLoraConfig, model_cls=RoutingLoraModel, prefix="lora_"
    )

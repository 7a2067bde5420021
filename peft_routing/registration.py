"""Registers the routing-LoRA adapter type with PEFT.

PEFT keeps its method names in a closed ``PeftType`` enum and refuses to register a name that is not a member, and
PEFT/transformers call ``peft_type.value`` in places, so a bare string will not do. We therefore add one member to the
enum at import time (idempotently) and then use PEFT's own ``register_peft_method``. After ``import peft_routing``,
``get_peft_model`` and ``PeftModel.from_pretrained`` resolve ``"ROUTING_LORA"`` like any built-in type.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "ROUTING_LORA"


def _add_enum_member(enum_cls: type, name: str) -> None:
    """Add ``name`` (value == name) to a ``str``-mixin Enum, as if it had been declared in the class body."""
    if name in enum_cls.__members__:
        return
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)


def routing_lora_peft_type() -> PeftType:
    """The ``PeftType`` member of this adapter type (created on first use)."""
    _add_enum_member(PeftType, PEFT_TYPE_NAME)
    return PeftType[PEFT_TYPE_NAME]


def register() -> None:
    """Make ``RoutingLoraConfig``/``RoutingLoraModel`` known to PEFT's mappings; safe to call twice."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import RoutingLoraConfig
    from .model import RoutingLoraModel

    peft_type = routing_lora_peft_type()
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    # Same prefix as LoRA (AdaLoRA does the same): every parameter we add is named "lora_*", so PEFT's missing-key
    # report on load covers the routing vectors too.
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=RoutingLoraConfig, model_cls=RoutingLoraModel, prefix="lora_"
    )

"""The ``ROUTING_LORA`` member of PEFT's ``PeftType`` enum.

PEFT keeps its method names in a closed ``PeftType`` enum and refuses to register a name that is not a member, and
PEFT/transformers call ``peft_type.value`` in places, so a bare string will not do. We add one member to the enum
(idempotently), as if it had been declared in the class body.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "ROUTING_LORA"


def _add_enum_member(enum_cls: type, name: str) -> None:
    """Add ``name`` (value == name) to a ``str``-mixin Enum."""
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

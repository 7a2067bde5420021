"""Makes the routing-LoRA adapter type known to PEFT, so that after ``import peft_routing`` ``get_peft_model`` and
``PeftModel.from_pretrained`` resolve ``"ROUTING_LORA"`` like any built-in type."""

from __future__ import annotations

import json
import os

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import RoutingLoraConfig
from .model import RoutingLoraModel
from .peft_type import PEFT_TYPE_NAME, routing_lora_peft_type


def register() -> None:
    """Register ``RoutingLoraConfig``/``RoutingLoraModel`` with PEFT's own ``register_peft_method``; idempotent."""
    _name_the_file_in_config_errors()
    if routing_lora_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    # Same prefix as LoRA (AdaLoRA does the same): every parameter we add is named "lora_*", so PEFT's missing-key
    # report on load covers the routing vectors too.
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=RoutingLoraConfig, model_cls=RoutingLoraModel, prefix="lora_"
    )


def _name_the_file_in_config_errors() -> None:
    """``PeftModel.from_pretrained``/``load_adapter`` read ``peft_type`` from the raw file before any config class
    (ours included) sees it; a malformed file then fails with a bare JSON/Key/RecursionError. Wrap that one PEFT
    step so the error names the file and what is wrong; a well-formed file reads exactly as before."""
    original = PeftConfig._get_peft_type
    if getattr(original, "names_the_file", False):
        return

    def get_peft_type(cls, model_id, **hub_kwargs):
        where = os.path.join(str(model_id), hub_kwargs.get("subfolder") or "", "adapter_config.json")
        try:
            peft_type = original.__func__(cls, model_id, **hub_kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as error:
            raise ValueError(f"{where} cannot be read as a PEFT config ({type(error).__name__}: {error}); it "
                             "must be a JSON object with a `peft_type`.") from None
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(f"{where} has peft_type {peft_type!r}, which PEFT does not know.")
        return peft_type

    get_peft_type.names_the_file = True
    PeftConfig._get_peft_type = classmethod(get_peft_type)

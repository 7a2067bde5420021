"""Validation of expert (adapter) names.

PEFT finds an adapter's tensors by looking for ``.<name>.`` inside state-dict keys, so a name that is
also a component of the model's own keys ("0", "mlp", "weight", "lora_A") silently loses or steals tensors on save.
We accept only names that cannot collide with a key component of the model they are added to.
"""

from __future__ import annotations

import re

from torch import nn

_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$")
_RESERVED = {"weight", "bias", "base_layer", "default_0"}


def key_components(model: nn.Module) -> set[str]:
    """Every dot-separated component of the model's module, parameter and buffer names.

    Args:
        model: the model experts are added to.
    """
    parts: set[str] = set()
    for name, module in model.named_modules():
        parts.update(name.split("."))
        parts.update(module._parameters.keys())
        parts.update(module._buffers.keys())
    parts.discard("")
    return parts


def check_expert_name(name: object, model: nn.Module | None, existing: list[str]) -> str:
    """Return ``name`` if it is safe as an expert name for ``model``; otherwise raise ValueError saying why.

    With ``model=None`` (no model loaded yet) the collision check with the model's own key components is skipped.

    Args:
        name: the proposed expert name.
        model: the model it is added to, or None.
        existing: the names already taken.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"Invalid expert name {name!r}: use 1-100 characters, a letter first, then letters, digits, '_' or '-' "
            "(names like '0' or 'a.b' break PEFT's state-dict keys)."
        )
    if name in existing:
        raise ValueError(
            f"An expert named {name!r} already exists in this model (experts: {existing}). "
            "Choose another name, or remove_expert() the old one first."
        )
    reserved = name in _RESERVED or name.startswith("lora_") or name in "lora_"
    if reserved or (model is not None and name in key_components(model)):
        raise ValueError(
            f"Invalid expert name {name!r}: it is also a part of the model's own parameter names, so PEFT would "
            "mix up its tensors on save. Choose a more specific name, e.g. 'expert_" + name + "'."
        )
    return name

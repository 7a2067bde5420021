"""What a routed expert's config may carry: a whitelist, checked on every config (made in code or read from disk).

A routed expert is plain LoRA (A, B, a scaling) plus a routing vector. A config field that makes PEFT run code, read
data, or touch the base model's weights when the expert is injected (PiSSA/OLoRA/CorDA/LoftQ/EVA initialisation,
``modules_to_save``, trained biases, layer replication, Megatron layers ...) has no place in a library of experts
that share one base model: each is refused with the field's name. Every number is checked finite and in range, and
every field has the type PEFT expects, so a stranger's ``adapter_config.json`` cannot turn into NaN or a hang later.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

MAX_RANK = 4096
MAX_ALPHA = 1e6
INIT_CHOICES = (True, False, "gaussian")

# field -> the only value(s) allowed; each of these otherwise changes what loading does (code, data or base weights)
_MUST_BE_UNSET = {
    "use_dora": "DoRA adds a magnitude vector the routed layers do not apply",
    "lora_bias": "a LoRA bias is not applied by routed layers",
    "use_bdlora": "block-diagonal LoRA is not applied by routed layers",
    "arrow_config": "Arrow routing replaces ours",
    "alora_invocation_tokens": "activated LoRA is not applied by routed layers",
    "velora_config": "VeLoRA changes the backward pass",
    "monteclora_config": "MonteCLoRA samples weights",
    "kasa_config": "KaSA rewrites the base weights' spectrum",
    "target_parameters": "routed layers adapt modules, not bare parameters",
    "layer_replication": "layer replication rebuilds the base model's layers",
    "trainable_token_indices": "trainable tokens rewrite the base model's embeddings",
    "modules_to_save": "modules_to_save replaces whole base modules with the expert's copies",
    "megatron_config": "Megatron layers import code named by the config",
    "loftq_config": "LoftQ re-quantizes and rewrites the base weights",
    "eva_config": "EVA initialisation needs the training data",
    "corda_config": "CorDA initialisation rewrites the base weights",
    "lora_ga_config": "LoRA-GA initialisation needs gradients of the training data",
    "use_qalora": "QA-LoRA needs quantized base layers",
}
_DEFAULTS = {"megatron_core": "megatron.core"}
_NEUTRALISED = {"auto_mapping": "it names a class for AutoPeftModel to import; routed experts never need it",
                "runtime_config": "it is a run-time option, never part of a saved expert"}


class ExpertConfigError(ValueError):
    """A config field a routed expert may not carry, or a value of the wrong type or out of range."""


def check_config_fields(config: Any) -> None:
    """Raise ``ExpertConfigError`` naming the first field of ``config`` outside the whitelist (module docstring).

    Args:
        config: a ``RoutingLoraConfig`` (during its ``__post_init__``).
    """
    for name, why in _MUST_BE_UNSET.items():
        if getattr(config, name, None):
            raise ExpertConfigError(f"`{name}` is not allowed in a routed expert ({why}); got "
                                    f"{getattr(config, name)!r}. Leave it unset.")
    for name, default in _DEFAULTS.items():
        if getattr(config, name, default) != default:
            raise ExpertConfigError(f"`{name}` must stay {default!r}; got {getattr(config, name)!r}.")
    if config.init_lora_weights not in INIT_CHOICES or not isinstance(config.init_lora_weights, (bool, str)):
        raise ExpertConfigError(
            f"`init_lora_weights` must be one of {INIT_CHOICES}; got {config.init_lora_weights!r}. PiSSA, OLoRA, "
            "CorDA, LoftQ and EVA initialisations rewrite (or need) the base model's weights, which every expert of "
            "a library shares.")
    if config.bias != "none":
        raise ExpertConfigError(f"`bias` must be 'none'; got {config.bias!r} (trained biases would overwrite the "
                                "base model's, which every expert shares).")
    _check_rank("r", config.r)
    _check_alpha("lora_alpha", config.lora_alpha)
    for key, value in _mapping("rank_pattern", config.rank_pattern).items():
        _check_rank(f"rank_pattern[{key!r}]", value)
    for key, value in _mapping("alpha_pattern", config.alpha_pattern).items():
        _check_alpha(f"alpha_pattern[{key!r}]", value)
    dropout = config.lora_dropout
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ExpertConfigError(f"`lora_dropout` must be a number in [0, 1); got {dropout!r}.")
    for name in ("fan_in_fan_out", "use_rslora", "inference_mode", "language_model_only", "ensure_weight_tying"):
        if not isinstance(getattr(config, name, False), bool):
            raise ExpertConfigError(f"`{name}` must be true or false; got {getattr(config, name)!r}.")
    _check_names("target_modules", config.target_modules)
    _check_names("exclude_modules", config.exclude_modules)
    _check_names("layers_pattern", config.layers_pattern)
    _check_layers(config.layers_to_transform)
    _check_saved_fields(config)


def neutralise_loaded_fields(raw: dict[str, Any], where: str, known: set[str]) -> dict[str, Any]:
    """The fields of a config file a routed expert may be built from: neutralised fields dropped with a warning,
    unknown fields (a newer PEFT's) dropped when unset and refused when set, ``target_modules`` required.

    Args:
        raw: the file's JSON object.
        where: the file, for messages.
        known: the config class's field names.
    """
    fields = dict(raw)
    for name in _NEUTRALISED:  # PEFT itself writes auto_mapping for some models: dropped without a word
        fields.pop(name, None)
    unknown = sorted(name for name in fields if name not in known)
    set_unknown = [name for name in unknown if fields[name] not in (None, False, [], {}, "", 0)]
    if set_unknown:
        raise ExpertConfigError(f"{where}: unknown config field(s) {set_unknown}, which peft-routing cannot check; "
                                "an expert may only carry LoRA and routing fields. Remove them.")
    for name in unknown:
        del fields[name]
    if fields.get("target_modules") is None:
        raise ExpertConfigError(f"{where}: `target_modules` is missing; an expert must say which modules it adapts.")
    return fields


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
        raise ExpertConfigError(f"`{name}` must be a whole number from 1 to {MAX_RANK}; got {value!r}.")


def _check_alpha(name: str, value: Any) -> None:
    if not _is_real(value) or abs(value) > MAX_ALPHA:
        raise ExpertConfigError(f"`{name}` must be a finite number of at most {MAX_ALPHA:g} in size; got {value!r}.")


def _mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ExpertConfigError(f"`{name}` must map module names to numbers; got {value!r}.")
    return value


def _check_names(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ExpertConfigError(f"`{name}` must be a module name, a regex or a list of names; got {value!r}.")


def _check_layers(value: Any) -> None:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if value is not None and (not isinstance(values, list)
                              or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
        raise ExpertConfigError(f"`layers_to_transform` must be a layer index or a list of them; got {value!r}.")


def _check_saved_fields(config: Any) -> None:
    """The fields save_expert writes for add_expert's checks: wrong types would make those checks say nonsense."""
    for name in ("base_model_type", "expert_name"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
            raise ExpertConfigError(f"`{name}` must be text; got {getattr(config, name)!r}.")
    hidden = config.base_hidden_size
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
        raise ExpertConfigError(f"`base_hidden_size` must be a positive whole number; got {hidden!r}.")
    shapes = config.module_shapes
    if shapes is None:
        return
    if not isinstance(shapes, dict):
        raise ExpertConfigError(f"`module_shapes` must map module paths to [out, in, r]; got {type(shapes).__name__}.")
    for path, shape in shapes.items():
        if (not isinstance(path, str) or not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ExpertConfigError(f"`module_shapes[{path!r}]` must be [out_features, in_features, r] (positive "
                                    f"whole numbers); got {shape!r}.")

"""Does an expert fit a base model? Every check runs before the model is touched, so a refusal changes nothing."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import RoutingLoraConfig
from .expert_folder import ExpertFiles
from .expert_tensors import ExpertMismatchError, group_expert_tensors

ADAPTABLE_TYPES = (nn.Linear, Conv1D)
__all__ = ["ExpertMismatchError", "plan_expert_load"]


def text_config_value(model: nn.Module, name: str) -> int | None:
    """A field (``hidden_size``, ``num_hidden_layers`` ...) of the (language) model's transformers config.

    Args:
        model: a transformers model (or any module; None without a config).
        name: the config field.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, name, None)


def text_hidden_size(model: nn.Module) -> int | None:
    """hidden_size of the (language) model, None without a transformers config."""
    return text_config_value(model, "hidden_size")


def text_num_blocks(model: nn.Module) -> int | None:
    """num_hidden_layers of the (language) model, None without a transformers config."""
    return text_config_value(model, "num_hidden_layers")


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> base layer (unwrapped from any PEFT layer) for every Linear / Conv1D of the model.

    Args:
        model: the base model, with or without PEFT layers injected.
    """
    found = {}
    for path, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, ADAPTABLE_TYPES) and not _inside_tuner_layer(path):
            found[path] = base
    return found


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, or of a GPT-2 Conv1D (whose weight is stored transposed).

    Args:
        base: an ``nn.Linear`` or a transformers ``Conv1D``.
    """
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def _inside_tuner_layer(path: str) -> bool:
    """PEFT wraps the original layer as `.base_layer` and adds `.lora_A.<name>` Linears: neither is a target."""
    return ".base_layer" in f".{path}" or ".lora_" in f".{path}"


def plan_expert_load(
    model: nn.Module,
    files: ExpertFiles,
    is_targeted: Callable[[RoutingLoraConfig, str], bool],
    allow_missing_routes: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """Check ``files`` against ``model`` and return module path -> {lora_A, lora_B, lora_route} tensors.

    Raises ExpertMismatchError naming the first problem; warns (and fills zeros) for missing routing vectors only when
    ``allow_missing_routes`` is set.

    Args:
        model: the model the expert is added to.
        files: the expert folder as read (``expert_folder.read_expert_folder``).
        is_targeted: whether the expert's config selects a module path of this model.
        allow_missing_routes: accept a plain LoRA folder, its routing vectors starting at zero.
    """
    config, where = files.config, files.source
    _check_model_identity(model, config, where)
    modules = adaptable_modules(model)
    targeted = {path for path in modules if is_targeted(config, path)}
    grouped = group_expert_tensors(files.tensors, where)
    unknown = sorted(set(grouped) - set(modules))
    if unknown:
        raise ExpertMismatchError(
            f"Expert {where} adapts module(s) this model does not have: {unknown[:5]}. It was made for another "
            "base model (or another module layout); add it to the model it was trained on."
        )
    untargeted = sorted(set(grouped) - targeted)
    if untargeted:
        raise ExpertMismatchError(
            f"Expert {where} has weights for {untargeted[:5]}, which its own target_modules do not select in this "
            "model. The folder's adapter_config.json and adapter_model.safetensors disagree."
        )
    missing = sorted(targeted - set(grouped))
    if missing:
        raise ExpertMismatchError(
            f"Expert {where} is missing weights for adapted module(s) {missing[:5]} that its target_modules select "
            "in this model. The folder is incomplete, or the expert was made for another base model."
        )
    zero_filled = [p for p in sorted(grouped) if "lora_route" not in grouped[p]]
    for path in sorted(grouped):
        _check_module_tensors(path, grouped[path], modules[path], config, where, allow_missing_routes)
    if zero_filled:
        warnings.warn(
            f"Expert {where} has no routing vectors for {len(zero_filled)} of {len(grouped)} modules; they start at "
            "zero (score 0). Train them with set_phase('router', name) before relying on routing.",
            stacklevel=3,
        )
    return grouped


def _check_model_identity(model: nn.Module, config: RoutingLoraConfig, where: str) -> None:
    hidden = text_hidden_size(model)
    if config.base_hidden_size is not None and hidden is not None and config.base_hidden_size != hidden:
        raise ExpertMismatchError(
            f"Expert {where} was trained on a model with hidden size {config.base_hidden_size}; this model's is "
            f"{hidden}. Add it to a model of the same architecture."
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.base_model_type and model_type and config.base_model_type != model_type:
        warnings.warn(
            f"Expert {where} was saved from a {config.base_model_type!r} model and is added to a {model_type!r} "
            "model; its module names and shapes fit, so it is loaded.",
            stacklevel=4,
        )


def _check_module_tensors(
    path: str,
    found: dict[str, torch.Tensor],
    base: nn.Module,
    config: RoutingLoraConfig,
    where: str,
    allow_missing_routes: bool,
) -> None:
    in_features, out_features = in_out_features(base)
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
    expected = {"lora_A": (rank, in_features), "lora_B": (out_features, rank), "lora_route": (in_features,)}
    for kind in ("lora_A", "lora_B"):
        if kind not in found:
            raise ExpertMismatchError(f"Expert {where} has no {kind} weight for module {path!r}.")
    if "lora_route" not in found:
        if not allow_missing_routes:
            raise ExpertMismatchError(
                f"Expert {where} has no routing vector for module {path!r} (a plain LoRA folder?). Pass "
                "allow_missing_routes=True to start its vectors at zero and train them with set_phase('router', ...)."
            )
        found["lora_route"] = torch.zeros(in_features)
    for kind, shape in expected.items():
        if tuple(found[kind].shape) != shape:
            raise ExpertMismatchError(
                f"Expert {where}: {kind} of module {path!r} has shape {tuple(found[kind].shape)}, but this model "
                f"needs {shape} (in_features={in_features}, out_features={out_features}, r={rank}). The expert does "
                "not fit this base model."
            )
    if math.prod(found["lora_A"].shape) == 0:
        raise ExpertMismatchError(f"Expert {where}: module {path!r} has an empty LoRA weight.")
    dtype = base.weight.dtype
    if dtype.is_floating_point and not all(torch.isfinite(found[k].to(dtype)).all() for k in expected):
        raise ExpertMismatchError(f"Expert {where}: a tensor of module {path!r} does not fit in this model's {dtype} "
                                  "(it would become inf).")

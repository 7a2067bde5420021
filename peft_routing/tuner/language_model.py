"""Which part of a multimodal model is its language model (``language_model_only=True`` adapts only that part).

VLM families name the language model differently (``language_model`` in LLaVA, Qwen2-VL, PaliGemma, Gemma3,
Mllama, InternVL; ``text_model`` in Idefics3/SmolVLM), so we ask the model what it is instead of guessing a name:
its transformers config has a text sub-config (``config.get_text_config()``), and the language model is the
shallowest submodule built from a config of that class that holds decoder blocks (rotary embeddings keep the
config too). ``get_decoder()`` and the usual attribute names are the
fallbacks. A multimodal model whose language model cannot be found is refused, never adapted whole.
"""

from __future__ import annotations

from torch import nn

# attribute names transformers uses for the language model of a VLM, tried only when the config does not tell
_KNOWN_NAMES = ("language_model", "text_model", "llm", "text_decoder")


def language_model_path(model: nn.Module) -> str | None:
    """Dotted path of the language model inside ``model``; None for a text-only model (all of it is language).

    Raises:
        ValueError: the model has a text sub-config (it is multimodal) but no submodule is its language model.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config is None or text_config is config:
        return None
    for path, module in model.named_modules():
        module_config = getattr(module, "config", None)
        if path and module_config is not config and type(module_config) is type(text_config) and _has_blocks(module):
            return path
    found = _decoder_path(model) or _known_name_path(model)
    if found is None:
        raise ValueError(
            f"language_model_only=True, but no submodule of {type(model).__name__} is its language model (none is "
            f"built from its {type(text_config).__name__}). Pass language_model_only=False with target_modules "
            "naming only the language model's layers (a regex such as r'.*text.*\\.(q|v)_proj').")
    return found


def is_beside_language_model(key: str, language_model: str | None) -> bool:
    """True for a module beside the language model inside its parent (vision tower, projector, connector ...).

    Modules outside that parent (the LM head of ``...ForConditionalGeneration``) count as language.
    """
    if language_model is None:
        return False
    parent = language_model.rpartition(".")[0]
    inside_parent = parent == "" or key.startswith(parent + ".")
    return inside_parent and not (key == language_model or key.startswith(language_model + "."))


def _has_blocks(module: nn.Module) -> bool:
    return any(isinstance(child, nn.ModuleList) for child in module.children())


def _decoder_path(model: nn.Module) -> str | None:
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if decoder is None or decoder is model:
        return None
    return next((path for path, module in model.named_modules() if module is decoder), None)


def _known_name_path(model: nn.Module) -> str | None:
    return next((path for path, _ in model.named_modules() if path.rpartition(".")[2] in _KNOWN_NAMES), None)

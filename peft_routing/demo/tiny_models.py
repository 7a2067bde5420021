"""Tiny chat models built in code (no downloads): for the examples, the tests and quick smoke runs.

A character-level tokenizer with a ChatML template, a 2-block Llama and a LLaVA (CLIP vision tower + Llama) with
its processor. Random weights: they train and route like real models, they just know nothing.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from .chat import chatml_template, llava_processor

_CHAT_TEXT = dict(
    vocab_size=112, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2,  # an untrained LM head with the usual 0.02 caps every logit near 0: nothing could be learnt
)
CHAT_TEMPLATE = chatml_template(default_system=None)
CHAT_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]


def tiny_chat_tokenizer():
    """A character-level tokenizer with a ChatML template, built in code (no hub): one token per character."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=CHAT_SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_chat_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(**_CHAT_TEXT)
    return LlamaForCausalLM(config).eval()


def tiny_chat_llava(seed: int = 0):
    """A tiny LLaVA with a processor (CLIP image processor + the character tokenizer): (model, processor).

    Args:
        seed: seeds the random weights.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_chat_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8)
    text = LlamaConfig(**_CHAT_TEXT)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                      image_token_index=image_token)).eval()
    return model, llava_processor(tokenizer, image_size=16, patch=8, template=CHAT_TEMPLATE)

"""Helpers the tests share: tiny models of every supported architecture built from configs (no hub, no downloads),
random libraries and expert stacks, token batches and task records."""

from __future__ import annotations

import random

import torch
from peft import get_peft_model
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from peft_routing import LLAMA_PROJECTIONS, RoutingLoraConfig
from peft_routing.demo.tiny_models import CHAT_TEMPLATE, tiny_chat_llama, tiny_chat_llava, tiny_chat_tokenizer
from peft_routing.ops import ExpertStack

__all__ = ["CHAT_TEMPLATE", "tiny_chat_llama", "tiny_chat_llava", "tiny_chat_tokenizer"]  # re-exported for tests

VOCAB = 96
_TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
LLAMA_TARGETS = LLAMA_PROJECTIONS


def tiny_llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(**_TEXT))


def tiny_qwen2() -> torch.nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**_TEXT))


def tiny_mistral() -> torch.nn.Module:
    return MistralForCausalLM(MistralConfig(**_TEXT, sliding_window=None))


def tiny_gpt2() -> torch.nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config)


def tiny_llava() -> torch.nn.Module:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8
    )
    config = LlavaConfig(text_config=LlamaConfig(**_TEXT), vision_config=vision, image_token_index=VOCAB - 1)
    return LlavaForConditionalGeneration(config)


def tiny_qwen2_vl() -> torch.nn.Module:
    text = dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(
        depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2, spatial_merge_size=1,
        temporal_patch_size=1, in_channels=3,
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2)
    return Qwen2VLForConditionalGeneration(config)


# name -> (factory, target_modules). GPT-2 uses transformers' Conv1D layers.
ARCHITECTURES = {
    "llama": (tiny_llama, LLAMA_TARGETS),
    "qwen2": (tiny_qwen2, LLAMA_TARGETS),
    "mistral": (tiny_mistral, LLAMA_TARGETS),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "llava": (tiny_llava, LLAMA_TARGETS),
    "qwen2_vl": (tiny_qwen2_vl, LLAMA_TARGETS),
}


def make_base(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0]().eval()


def expert_config(arch: str, r: int = 4, **overrides) -> RoutingLoraConfig:
    """A config whose experts start with random (non-zero) A and B, so every expert changes the output."""
    values = dict(r=r, lora_alpha=2 * r, target_modules=ARCHITECTURES[arch][1], init_lora_weights=False)
    values.update(overrides)
    return RoutingLoraConfig(**values)


def randomize_routes(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    """Give every routing vector random values so that routing actually discriminates between experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_route." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_library(arch: str, n_experts: int, ranks=None, seed: int = 0, **config_overrides):
    """A PeftModel with ``n_experts`` random experts (ranks cycling through ``ranks``) and random routing vectors."""
    ranks = ranks or [4]
    base = make_base(arch, seed)
    model = get_peft_model(base, expert_config(arch, ranks[0], **config_overrides), adapter_name="expert_0")
    for i in range(1, n_experts):
        model.add_adapter(f"expert_{i}", expert_config(arch, ranks[i % len(ranks)], **config_overrides))
    randomize_routes(model, seed=seed)
    model.eval()
    return model


def token_batch(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 3, (batch, length), generator=generator)


def random_stack(n: int, r_max: int, d_in: int, d_out: int, seed: int, dtype: torch.dtype = torch.float32,
                 ranks: list[int] | None = None, spare_slots: int = 0) -> ExpertStack:
    """n experts with standard normal vectors, A and B and scales in [0.5, 1.5). Expert j has rank ranks[j] (zero
    rows above it, as ExpertStack.build pads them); spare_slots free slots of garbage follow the experts, as a
    stack that has room to grow has."""
    g = torch.Generator().manual_seed(seed)
    slots = n + spare_slots
    vectors = torch.randn(slots, d_in, generator=g)
    a = torch.randn(slots, r_max, d_in, generator=g)
    b_t = torch.randn(slots, r_max, d_out, generator=g)
    scales = torch.rand(slots, generator=g) + 0.5
    for j, r in enumerate(ranks or []):
        a[j, r:] = 0
        b_t[j, r:] = 0
    return ExpertStack([f"e{i}" for i in range(n)], *(t.to(dtype) for t in (vectors, a, b_t, scales)))


def converted(stack: ExpertStack, **place) -> ExpertStack:
    """The same experts in another dtype and/or device (``place``: keyword arguments of Tensor.to)."""
    return ExpertStack(stack.names, stack.vectors.to(**place), stack.a.to(**place), stack.b_t.to(**place),
                       stack.scales.to(**place))


def task_records(prefix: str, answer: str, n: int = 16, seed: int = 0) -> list[dict]:
    """A toy task: prompts "PREFIX:xxxxx" (letters for an upper-case prefix, digits otherwise), one fixed answer."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" if prefix.isupper() else "0123456789"
    return [{"prompt": f"{prefix}:{''.join(rng.choices(letters, k=5))}", "response": answer} for _ in range(n)]

"""Test fixtures: tiny vision-language models of every family transformers can build, with random weights.

Each family's builder makes a model from config classes only (no hub, no downloads), hidden sizes 32-64, one or two
layers per tower, 16-32 px images and a vocabulary of 512, and returns it with two batches of 2:

* ``with_image``: everything ``model(**with_image)`` needs, with exactly as many image placeholder tokens as the
  family's vision side produces (the count is computed from the config in each builder);
* ``text_only``: ``input_ids`` and ``attention_mask`` without any image token.

``language_model_path`` is the dotted path (as in ``model.named_modules()``) of the text decoder, the module that holds
the decoder's ``layers`` ModuleList; ``non_language_paths`` are the vision tower / projector / connector modules next
to it. Both were read off the models by hand and are meant as ground truth for tests.

This is a helper imported by tests, not a test module. ``python tests/tiny_vlms.py`` builds every family, checks it
and prints a summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaTextConfig,
    MllamaVisionConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

VOCAB = 512
BATCH = 2
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN = VOCAB - 1  # every family's image placeholder, inside the vocabulary
# Other special ids some families need, also inside the vocabulary and never drawn as ordinary text tokens.
VIDEO_TOKEN, VISION_START, VISION_END, BOI_TOKEN, EOI_TOKEN, FAKE_IMAGE_TOKEN = range(VOCAB - 7, VOCAB - 1)
TEXT_LOW, TEXT_HIGH = 3, VOCAB - 8  # ordinary text tokens are drawn from [TEXT_LOW, TEXT_HIGH)

_LLAMA_TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


@dataclass
class TinyVLM:
    """A tiny model, its two input batches and the module paths of its language and vision sides."""

    model: nn.Module
    with_image: dict
    text_only: dict
    language_model_path: str
    non_language_paths: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- inputs


def _text(length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (BATCH, length), generator=generator)


def _with_placeholders(n_image: int, generator: torch.Generator, before: tuple[int, ...] = (),
                       after: tuple[int, ...] = (), prefix: int = 4, suffix: int = 6) -> torch.Tensor:
    """BOS, ``prefix`` text tokens, ``before``, ``n_image`` image tokens, ``after``, ``suffix`` text tokens."""
    def fixed(ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids] * BATCH, dtype=torch.long).reshape(BATCH, -1)

    parts = [fixed([BOS]), _text(prefix, generator), fixed(list(before)), fixed([IMAGE_TOKEN] * n_image),
             fixed(list(after)), _text(suffix, generator)]
    return torch.cat(parts, dim=1)


def _batch(input_ids: torch.Tensor, **extra: torch.Tensor) -> dict:
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra)


def _text_only(generator: torch.Generator, length: int = 12) -> dict:
    return _batch(torch.cat([torch.full((BATCH, 1), BOS), _text(length - 1, generator)], dim=1))


def _pixels(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _unzero(*params: nn.Parameter, std: float) -> None:
    """Give parameters that transformers initializes to zero (so the image has no effect) random values."""
    with torch.no_grad():
        for param in params:
            param.normal_(0.0, std)


# --------------------------------------------------------------------------------------------------------- builders


def _llava(g: torch.Generator) -> TinyVLM:
    vision = CLIPVisionConfig(**_VIT, image_size=16, patch_size=4)
    config = LlavaConfig(text_config=LlamaConfig(**_LLAMA_TEXT), vision_config=vision, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    n_image = (vision.image_size // vision.patch_size) ** 2  # "default" drops CLIP's CLS token
    config.image_seq_length = n_image
    model = LlavaForConditionalGeneration(config)
    with_image = _batch(_with_placeholders(n_image, g), pixel_values=_pixels(BATCH, 3, 16, 16, generator=g))
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_tower", "model.multi_modal_projector"])


def _llava_next(g: torch.Generator) -> TinyVLM:
    tile, patch, height, width = 16, 8, 16, 32  # one 16x32 image = a 1x2 grid of 16 px tiles plus the base tile
    vision = CLIPVisionConfig(**_VIT, image_size=tile, patch_size=patch)
    config = LlavaNextConfig(text_config=LlamaConfig(**_LLAMA_TEXT), vision_config=vision,
                             image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[height, width]],
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    side = tile // patch
    rows, cols = side * height // tile, side * width // tile  # the tiles' patch grid; the image fills it: no unpad
    n_image = side * side + rows * (cols + 1)  # base tile + tile grid with one newline token per row
    config.image_seq_length = n_image
    model = LlavaNextForConditionalGeneration(config)
    n_tiles = 1 + (height // tile) * (width // tile)
    pixels = _pixels(BATCH, n_tiles, 3, tile, tile, generator=g)
    with_image = _batch(_with_placeholders(n_image, g), pixel_values=pixels,
                        image_sizes=torch.tensor([[height, width]] * BATCH))
    # model.model.image_newline (a bare nn.Parameter, not a module) is the one vision-side weight outside these
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_tower", "model.multi_modal_projector"])


def _qwen_vl_inputs(vision, g: torch.Generator, size: int = 16) -> dict:
    """Qwen2-VL / Qwen2.5-VL: flattened patches of ``temporal_patch_size`` frames, ``image_grid_thw`` per image."""
    p, t, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    grid = torch.tensor([[1, size // p, size // p]] * BATCH)
    n_image = int(grid[0].prod()) // merge**2
    patches = int(grid.prod(dim=1).sum())
    ids = _with_placeholders(n_image, g, before=(VISION_START,), after=(VISION_END,))
    # mm_token_type_ids (0 text, 1 image) places the image tokens on the M-RoPE grid; Qwen2-VL requires it
    return _batch(ids, pixel_values=_pixels(patches, 3 * t * p * p, generator=g), image_grid_thw=grid,
                  mm_token_type_ids=(ids == IMAGE_TOKEN).long())


def _qwen_family(config_class, model_class, vision: dict, g: torch.Generator) -> TinyVLM:
    """Qwen2-VL and Qwen2.5-VL share one layout: ``model.language_model`` (M-RoPE) beside ``model.visual``."""
    text = dict(_LLAMA_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]})  # head_dim 8
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                          video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                          vision_end_token_id=VISION_END)
    return TinyVLM(model_class(config), _qwen_vl_inputs(config.vision_config, g), _text_only(g),
                   "model.language_model", ["model.visual"])


def _qwen2_vl(g: torch.Generator) -> TinyVLM:
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen_family(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, g)


def _qwen2_5_vl(g: torch.Generator) -> TinyVLM:
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0])
    return _qwen_family(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, g)


def _idefics_inputs(config, g: torch.Generator) -> dict:
    """Idefics3 / SmolVLM: one image per sample, <fake_token_around_image> around its image tokens."""
    size = config.vision_config.image_size
    n_image = (size // config.vision_config.patch_size) ** 2 // config.scale_factor**2
    ids = _with_placeholders(n_image, g, before=(FAKE_IMAGE_TOKEN,), after=(FAKE_IMAGE_TOKEN,))
    return _batch(ids, pixel_values=_pixels(BATCH, 1, 3, size, size, generator=g),
                  pixel_attention_mask=torch.ones(BATCH, 1, size, size, dtype=torch.bool))


def _idefics_family(vision_class, config_class, model_class, g: torch.Generator) -> TinyVLM:
    """Idefics3 and SmolVLM share one layout: ``model.text_model`` beside ``vision_model`` and ``connector``."""
    vision = vision_class(**_VIT, image_size=16, patch_size=4)
    config = config_class(text_config=LlamaConfig(**_LLAMA_TEXT), vision_config=vision,
                          image_token_id=IMAGE_TOKEN, scale_factor=2, pad_token_id=PAD)
    return TinyVLM(model_class(config), _idefics_inputs(config, g), _text_only(g), "model.text_model",
                   ["model.vision_model", "model.connector"])


def _idefics3(g: torch.Generator) -> TinyVLM:
    return _idefics_family(Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration, g)


def _smolvlm(g: torch.Generator) -> TinyVLM:
    return _idefics_family(SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, g)


def _paligemma(g: torch.Generator) -> TinyVLM:
    text = GemmaConfig(**dict(_LLAMA_TEXT, num_key_value_heads=1, head_dim=8))
    vision = SiglipVisionConfig(**_VIT, image_size=16, patch_size=4, vision_use_head=False)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                             projection_dim=32, hidden_size=32, vocab_size=VOCAB)
    n_image = config.text_config.num_image_tokens  # (image_size // patch_size) ** 2, set by PaliGemmaConfig
    ids = torch.cat([torch.full((BATCH, n_image), IMAGE_TOKEN), torch.full((BATCH, 1), BOS), _text(9, g)], dim=1)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, -3:] = 1  # prefix (image + prompt) is 0, the answer ("suffix") is 1
    model = PaliGemmaForConditionalGeneration(config)
    with_image = _batch(ids, pixel_values=_pixels(BATCH, 3, 16, 16, generator=g), token_type_ids=token_type_ids)
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_tower", "model.multi_modal_projector"])


def _gemma3(g: torch.Generator) -> TinyVLM:
    text = Gemma3TextConfig(**dict(_LLAMA_TEXT, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"]))
    vision = SiglipVisionConfig(**_VIT, image_size=16, patch_size=4, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN,
                          boi_token_index=BOI_TOKEN, eoi_token_index=EOI_TOKEN)
    n_image = config.mm_tokens_per_image  # the projector average-pools the 4x4 patch grid to 2x2
    ids = _with_placeholders(n_image, g, before=(BOI_TOKEN,), after=(EOI_TOKEN,))
    model = Gemma3ForConditionalGeneration(config)
    _unzero(model.model.multi_modal_projector.mm_input_projection_weight, std=vision.hidden_size**-0.5)
    with_image = _batch(ids, pixel_values=_pixels(BATCH, 3, 16, 16, generator=g),
                        token_type_ids=(ids == IMAGE_TOKEN).long())
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_tower", "model.multi_modal_projector"])


def _mllama(g: torch.Generator) -> TinyVLM:
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                                attention_heads=4, image_size=16, patch_size=4, max_num_tiles=1,
                                supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                                vision_output_dim=64)  # hidden_size * (1 + len(intermediate_layers_indices))
    text = MllamaTextConfig(**dict(_LLAMA_TEXT, cross_attention_layers=[1]))  # layer 1 is a cross-attention layer
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)
    model = MllamaForConditionalGeneration(config)
    layer = model.model.language_model.layers[1]
    with torch.no_grad():  # the cross-attention gates start at zero (tanh(0) = 0), which shuts the image out
        layer.cross_attn_attn_gate.fill_(1.0)
        layer.cross_attn_mlp_gate.fill_(1.0)
    ids = _with_placeholders(1, g)  # one <|image|> token; the image enters through cross-attention
    n_images, n_tiles = 1, vision.max_num_tiles
    cross_mask = torch.zeros(BATCH, ids.shape[1], n_images, n_tiles, dtype=torch.long)
    cross_mask[:, (ids[0] == IMAGE_TOKEN).nonzero()[0, 0]:] = 1  # tokens from the image on attend to it
    with_image = _batch(ids, pixel_values=_pixels(BATCH, n_images, n_tiles, 3, 16, 16, generator=g),
                        aspect_ratio_ids=torch.ones(BATCH, n_images, dtype=torch.long),  # id 1 = aspect ratio [1, 1]
                        aspect_ratio_mask=torch.ones(BATCH, n_images, n_tiles, dtype=torch.long),
                        cross_attention_mask=cross_mask)
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_model", "model.multi_modal_projector"])


def _internvl(g: torch.Generator) -> TinyVLM:
    vision = InternVLVisionConfig(**_VIT, image_size=16, patch_size=4)
    config = InternVLConfig(text_config=Qwen2Config(**_LLAMA_TEXT), vision_config=vision,
                            image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, vision_feature_layer=-1)
    # "default" drops the CLS token; the pixel shuffle merges 2x2 patches into one token
    n_image = int((16 // 4) ** 2 * config.downsample_ratio**2)
    config.image_seq_length = n_image
    model = InternVLForConditionalGeneration(config)
    with_image = _batch(_with_placeholders(n_image, g), pixel_values=_pixels(BATCH, 3, 16, 16, generator=g))
    return TinyVLM(model, with_image, _text_only(g), "model.language_model",
                   ["model.vision_tower", "model.multi_modal_projector"])


_BUILDERS: dict[str, Callable[[torch.Generator], TinyVLM]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "internvl": _internvl,
}
# family -> why it cannot be built tiny in this transformers version (empty: all of them can)
SKIPPED: dict[str, str] = {}
FAMILIES: tuple[str, ...] = tuple(name for name in _BUILDERS if name not in SKIPPED)


def build_tiny_vlm(family: str, seed: int = 0) -> TinyVLM:
    """The tiny model of ``family`` (random weights from ``seed``, eval mode, float32) and its two input batches."""
    if family in SKIPPED:
        raise ValueError(f"{family}: {SKIPPED[family]}")
    if family not in _BUILDERS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    tiny = _BUILDERS[family](torch.Generator().manual_seed(seed))
    tiny.model = tiny.model.float().eval()
    return tiny


# ------------------------------------------------------------------------------------------------------ self-check


def check_tiny_vlm(tiny: TinyVLM) -> None:
    """Both batches run to finite logits, the image changes them, and the recorded paths are the right modules."""
    model, modules = tiny.model, dict(tiny.model.named_modules())
    decoder = modules[tiny.language_model_path]
    assert isinstance(decoder.layers, nn.ModuleList), tiny.language_model_path
    for path in tiny.non_language_paths:
        assert path in modules, path
    with torch.no_grad():
        with_image = model(**tiny.with_image).logits
        text_only = model(**tiny.text_only).logits
        other = dict(tiny.with_image, pixel_values=torch.randn_like(tiny.with_image["pixel_values"]))
        other_image = model(**other).logits
    assert with_image.shape[:2] == tiny.with_image["input_ids"].shape
    assert text_only.shape[:2] == tiny.text_only["input_ids"].shape
    assert torch.isfinite(with_image).all() and torch.isfinite(text_only).all()
    assert not torch.allclose(with_image, other_image), "the image does not change the logits"


def uncovered_parameters(tiny: TinyVLM) -> list[str]:
    """Parameters outside the language model, ``non_language_paths`` and the LM head."""
    prefixes = [tiny.language_model_path, *tiny.non_language_paths, "lm_head"]
    return [name for name, _ in tiny.model.named_parameters()
            if not any(name == p or name.startswith(p + ".") for p in prefixes)]


def _find_path(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "?")


def _sub_configs(config) -> str:
    names = [k for k, v in vars(config).items() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return ", ".join(f"{k}={type(getattr(config, k)).__name__}" for k in names)


if __name__ == "__main__":
    for family in FAMILIES:
        start = time.perf_counter()
        tiny = build_tiny_vlm(family)
        check_tiny_vlm(tiny)
        seconds = time.perf_counter() - start
        n_params = sum(p.numel() for p in tiny.model.parameters())
        decoder = tiny.model.get_decoder() if hasattr(tiny.model, "get_decoder") else None
        decoder_text = f"{type(decoder).__name__} at {_find_path(tiny.model, decoder)!r}" if decoder else "-"
        print(f"{family:11s} {seconds:5.2f}s {n_params:8d} params  language_model_path={tiny.language_model_path}"
              f"  non_language_paths={tiny.non_language_paths}")
        print(f"{'':11s} config={type(tiny.model.config).__name__}: {_sub_configs(tiny.model.config)}")
        print(f"{'':11s} get_decoder() -> {decoder_text}  with_image keys={sorted(tiny.with_image)}"
              f"  seq={tiny.with_image['input_ids'].shape[1]}  other params={uncovered_parameters(tiny)}")
    for family, reason in SKIPPED.items():
        print(f"{family:11s} SKIPPED: {reason}")

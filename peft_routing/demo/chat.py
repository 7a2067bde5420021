"""Chat templates and processors built in code, for models that come without them (tiny test models, the LLaVA
build of SmolLM2): ChatML with image slots, and a LLaVA processor around any tokenizer."""

from __future__ import annotations

from transformers import CLIPImageProcessor, LlavaProcessor

IMAGE_TOKEN = "<image>"


def chatml_template(default_system: str | None) -> str:
    """ChatML with image slots; ``default_system`` is added when a conversation has no system message.

    Args:
        default_system: a system message added when a conversation has none (None: no default).
    """
    system = ""
    if default_system:
        system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + default_system
                  + "<|im_end|>\n{% endif %}")
    return (
        system + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + IMAGE_TOKEN + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def llava_processor(tokenizer, image_size: int, patch: int, template: str) -> LlavaProcessor:
    """A LLaVA processor: CLIP image preprocessing at ``image_size``, one ``<image>`` slot per vision patch.

    Args:
        tokenizer: the language model's tokenizer (with ``<image>`` among its tokens).
        image_size: images are resized and cropped to this square.
        patch: the vision tower's patch size.
        template: the chat template.
    """
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template, image_token=IMAGE_TOKEN)

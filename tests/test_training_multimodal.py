"""Training a LLaVA-style model on image tasks: the processor's chat template and image tokens, answer-only labels,
and the vision tower and projector left untouched."""

from __future__ import annotations

import torch
from peft import get_peft_model
from PIL import Image
from testing_utils import LLAMA_TARGETS, tiny_chat_llava

from peft_routing import RoutingLoraConfig
from peft_routing.workflow import IGNORE_INDEX, ChatCollator, answer_accuracy, learn_task, load_examples

FAST = dict(max_steps=10, learning_rate=2e-2, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=1,
            lr_scheduler_type="constant")


def colour_records(n: int = 12) -> list[dict]:
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    names = list(colours)
    return [{"prompt": "Colour?", "response": names[i % 2], "image": Image.new("RGB", (20, 20), colours[names[i % 2]])}
            for i in range(n)]


def test_llava_collation_puts_image_tokens_in_the_prompt_and_labels_on_the_answer():
    model, processor = tiny_chat_llava()
    examples = load_examples(colour_records(2))
    batch = ChatCollator(processor)(examples)
    image_token = model.config.image_token_index
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [4, 4]  # (16 / 8)^2 patches each
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    labelled = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert labelled == "red<|im_end|>\n"


def test_llava_learns_an_image_task_and_only_language_model_adapters_change():
    model, processor = tiny_chat_llava()
    config = RoutingLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, top_k=1)
    peft_model = get_peft_model(model, config, adapter_name="colours")
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    report = learn_task(peft_model, "colours", colour_records(), processor, expert_args=FAST,
                        router_args=dict(max_steps=2, per_device_train_batch_size=4, disable_tqdm=True))
    moved = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all("language_model" in n and ".colours" in n for n in moved)
    assert report.expert.losses[-1][1] < report.expert.losses[0][1]
    accuracy = answer_accuracy(peft_model, processor, load_examples(colour_records(4)))
    assert 0.0 <= accuracy <= 100.0

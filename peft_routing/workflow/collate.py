"""Batches of chat examples for training and evaluation, built with the model's own tokenizer or processor.

The text is the model's chat template applied to the conversation; the labels cover the answer (the last,
assistant, message, with the template's end-of-turn tokens) and nothing else. Rows are padded on the left, so
every answer ends in the last column. That lets ``answer_logits_only=True`` pass ``logits_to_keep`` to the model:
the LM head (576 x 49152 on SmolLM2, the largest matmul of a small model) then runs on the answer positions only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .data import ChatExample, DataError, open_image

IGNORE_INDEX = -100


@dataclass
class RenderedExample:
    full_text: str  # prompt + answer, through the chat template
    prompt_text: str  # prompt + the template's generation prompt
    answer_tokens: int  # tokens of full_text after prompt_text
    images: list[Any]


class ChatCollator:
    """Turns a list of ``ChatExample`` into model inputs with answer-only labels.

    ``processor`` is a tokenizer (text models) or a multimodal processor (LLaVA, Qwen2-VL ...) with a chat template.
    ``max_length`` truncates the prompt from the left (text only; the answer is always kept whole).
    """

    def __init__(self, processor, *, max_length: int | None = None, answer_logits_only: bool = False) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(self.tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
            raise ValueError("The tokenizer/processor has no chat template; set its `chat_template` first.")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        self.answer_logits_only = answer_logits_only

    def render(self, example: ChatExample) -> RenderedExample:
        example.answer  # noqa: B018  (raises a clear error for an example without an answer)
        messages = _with_image_slots(example.messages, len(example.images))
        prompt = self._apply_template(messages[:-1], add_generation_prompt=True)
        full = self._apply_template(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("The chat template renders the prompt differently with and without the answer; "
                            "answer-only labels need a template whose prompt is a prefix of the conversation.")
        answer_tokens = self._count_tokens(full) - self._count_tokens(prompt)
        if answer_tokens <= 0:
            raise DataError(f"The answer {example.answer!r} has no tokens after the chat template.")
        return RenderedExample(full, prompt, answer_tokens, example.images)

    def __call__(self, examples: list[ChatExample]) -> dict[str, torch.Tensor]:
        rendered = [self.render(example) for example in examples]
        batch = self._encode([r.full_text for r in rendered], [r.images for r in rendered])
        answer_lengths = torch.tensor([r.answer_tokens for r in rendered])
        batch = self._truncate(batch, int(answer_lengths.max()))
        labels = batch["input_ids"].clone()
        width = labels.shape[1]
        positions = torch.arange(width).unsqueeze(0)
        labels[positions < width - answer_lengths.unsqueeze(1)] = IGNORE_INDEX
        if self.answer_logits_only:
            keep = int(answer_lengths.max()) + 1  # +1: the logit just before the answer predicts its first token
            batch["logits_to_keep"] = keep
            labels = labels[:, -keep:]
        batch["labels"] = labels
        return batch

    def prompts(self, examples: list[ChatExample]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (with the generation prompt) for ``model.generate``.

        Args:
            examples: the prompts (any answers are left out).
        """
        texts, images = [], []
        for example in examples:
            messages = _with_image_slots(example.prompt_messages, len(example.images))
            texts.append(self._apply_template(messages, add_generation_prompt=True))
            images.append(example.images)
        return self._encode(texts, images)

    # -------------------------------------------------------------------------------------------------- helpers
    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        common = dict(padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        if any(images):
            if self.processor is self.tokenizer:
                raise DataError("These examples have images, but the model was given a tokenizer, not a processor.")
            pictures = [open_image(image) for row in images for image in row]
            return dict(self.processor(text=texts, images=pictures, **common))
        return dict(self.tokenizer(texts, **common))

    def _truncate(self, batch: dict[str, torch.Tensor], longest_answer: int) -> dict[str, torch.Tensor]:
        width = batch["input_ids"].shape[1]
        if self.max_length is None or width <= self.max_length:
            return batch
        if "pixel_values" in batch:
            raise DataError(f"An example with images has {width} tokens, more than max_length={self.max_length}; "
                            "raise max_length (image tokens cannot be cut).")
        if longest_answer >= self.max_length:
            raise DataError(f"An answer has {longest_answer} tokens, at least max_length={self.max_length}; "
                            "raise max_length or shorten the answers.")
        return {key: value[:, -self.max_length:] for key, value in batch.items()}


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes ``logits_to_keep``, which ``answer_logits_only`` needs.

    Args:
        model: a transformers model or a PeftModel around one.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _with_image_slots(messages: list[dict], n_images: int) -> list[dict]:
    """Put ``n_images`` image placeholders before the first user message's text, as multimodal templates expect."""
    if n_images == 0:
        return messages
    messages = [dict(m) for m in messages]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[first_user]["content"]
    if isinstance(content, str):
        messages[first_user]["content"] = [{"type": "image"}] * n_images + [{"type": "text", "text": content}]
    return messages

"""The generated image tasks and the LLaVA built around a text model (the multimodal half's base), on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_routing.demo.image_tasks import COLORS, caption_questions
from peft_routing.demo.smollm2_llava import AlignmentSettings, align_vision, llava_from_text_model, vision_parameters
from peft_routing.demo.tasks import make_task
from peft_routing.demo.tiny_models import tiny_chat_llama, tiny_chat_tokenizer


def _cells_with_ink(image) -> list[tuple[int, int, int]]:
    """The colour of each 16x16 cell that is not blank, read off the pixels."""
    pixels = np.asarray(image).astype(int)
    found = []
    for row in range(2):
        for col in range(2):
            cell = pixels[16 * row: 16 * row + 16, 16 * col: 16 * col + 16].reshape(-1, 3)
            ink = cell[(cell != 255).any(axis=1)]
            if len(ink):
                values, counts = np.unique(ink, axis=0, return_counts=True)
                found.append(tuple(values[counts.argmax()]))
    return found


@pytest.mark.parametrize("name", ["color", "count"])
def test_image_answers_match_the_pixels(name):
    task = make_task(name, 40, 10)
    for example in task.train + task.test:
        cells = _cells_with_ink(example.images[0])
        assert len(set(cells)) == 1  # one colour per scene
        if name == "color":
            assert cells[0] == COLORS[example.answer]
        else:
            assert int(example.answer) == len(cells)


def test_image_task_splits_are_disjoint_and_count_text_is_right():
    task = make_task("color", 200, 40)
    train = {(repr(e.messages), e.images[0].tobytes()) for e in task.train}
    assert not any((repr(e.messages), e.images[0].tobytes()) in train for e in task.test)
    for example in make_task("count_text", 30, 5).train:
        listed = example.messages[0]["content"].split(": ", 1)[1].split("?")[0]
        assert int(example.answer) == len(listed.split(", "))


def test_caption_probe_has_one_right_option_that_matches_the_pixels():
    for prompt, options, right in caption_questions(seed=3, n=20):
        cells = _cells_with_ink(prompt.images[0])
        color = next(name for name, rgb in COLORS.items() if rgb == cells[0])
        assert len(set(options)) == len(options)
        words = options[right].split()
        assert words[1] == color and ["one", "two", "three", "four"].index(words[0]) + 1 == len(cells)
        assert prompt.messages[-1]["role"] == "user"  # the options are scored as the answer


def test_llava_without_images_is_the_text_model():
    text, tokenizer = tiny_chat_llama(seed=4), tiny_chat_tokenizer()
    llava, processor = llava_from_text_model(text, tokenizer)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llava(input_ids=ids).logits, text(input_ids=ids).logits, rtol=0, atol=0)
    rendered = processor.apply_chat_template(make_task("count", 1, 1).train[0].messages, tokenize=False)
    assert rendered.count("<image>") == 1  # the processor expands it to the vision tower's patch count


def test_alignment_trains_only_the_vision_side():
    llava, processor = llava_from_text_model(tiny_chat_llama(seed=5), tiny_chat_tokenizer())
    before = {n: p.detach().clone() for n, p in llava.named_parameters()}
    align_vision(llava, processor, AlignmentSettings(steps=3, batch_size=2))
    changed = {n for n, p in llava.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(vision_parameters(llava))
    assert not any(p.requires_grad for p in llava.parameters())  # frozen afterwards, as the paper freezes it

"""Scoring a model (one expert, or the routed library) on examples with reference answers.

``answer_accuracy`` is greedy exact match computed in one teacher-forced pass: an example counts as correct when,
at every answer position, the model's most likely next token is the reference token. That is exactly the case in
which greedy ``generate`` would write the reference answer and its end-of-turn token, at the cost of one forward
pass instead of one per generated token. ``choice_accuracy`` scores multiple-choice questions by the
log-likelihood of each option as the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .collate import IGNORE_INDEX, ChatCollator, accepts_logits_to_keep
from .data import ChatExample


@torch.no_grad()
def answer_token_logprobs(model, collator: ChatCollator, examples: Sequence[ChatExample]):
    """Per example: (log-probabilities of the reference answer tokens, whether each is the argmax).

    Args:
        model: the model to score.
        collator: builds the batch (answer-only labels).
        examples: examples with reference answers.
    """
    batch = collator(list(examples))
    labels = batch.pop("labels")
    with routing_on_prompt_only(model, batch["input_ids"], labels):
        logits = model(**batch).logits.float()
    logits, targets = logits[:, :-1], labels[:, 1:]  # logit t predicts token t + 1
    mask = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    is_argmax = logits.argmax(dim=-1) == safe_targets
    return [(logprobs[i][mask[i]], is_argmax[i][mask[i]]) for i in range(len(examples))]


def answer_accuracy(model, processor, examples: Sequence[ChatExample], *, batch_size: int = 16,
                    progress: str | None = None) -> float:
    """Greedy exact-match accuracy in percent (see the module docstring).

    Args:
        model: the model to score (one expert, the routed library, or a base model).
        processor: its tokenizer or multimodal processor, with a chat template.
        examples: examples with reference answers.
        batch_size: examples per forward pass.
        progress: a progress bar's label, or None for no bar.
    """
    collator = _collator(model, processor)
    correct = 0
    for chunk in chunks(examples, batch_size, progress):
        correct += sum(bool(hits.all()) for _, hits in answer_token_logprobs(model, collator, chunk))
    return 100.0 * correct / len(examples)


def answer_nll(model, processor, examples: Sequence[ChatExample], *, batch_size: int = 8,
               progress: str | None = None) -> float:
    """Mean negative log-likelihood per answer token (nats): a continuous probe of what a library does to text
    that no expert learnt, where accuracy would move only by whole questions.

    Args:
        model: the model to score.
        processor: its tokenizer or multimodal processor.
        examples: examples whose answers are the text to score.
        batch_size: examples per forward pass.
        progress: a progress bar's label, or None for no bar.
    """
    collator = _collator(model, processor)
    total, count = 0.0, 0
    for chunk in chunks(examples, batch_size, progress):
        for logprobs, _ in answer_token_logprobs(model, collator, chunk):
            total, count = total - float(logprobs.sum()), count + logprobs.numel()
    return total / max(count, 1)


def option_scores(model, processor, questions: Sequence[tuple[ChatExample, Sequence[str]]], *,
                  batch_size: int = 16, progress: str | None = None) -> list[list[float]]:
    """For each (question, options): the summed log-probability of each option's own tokens as the answer.

    The template's end-of-turn tokens after the option are left out, so a model is not judged on how tersely it
    likes to answer.

    Args:
        model: the model to score.
        processor: its tokenizer or multimodal processor.
        questions: (question, options) pairs.
        batch_size: candidate answers per forward pass.
        progress: a progress bar's label, or None for no bar.
    """
    collator = _collator(model, processor)
    option_tokens = lambda option: len(collator.tokenizer(option, add_special_tokens=False)["input_ids"])  # noqa: E731
    candidates = [
        (q_index, ChatExample(question.prompt_messages + [{"role": "assistant", "content": option}], question.images))
        for q_index, (question, options) in enumerate(questions)
        for option in options
    ]
    scores: list[list[float]] = [[] for _ in questions]
    for chunk in chunks(candidates, batch_size, progress):
        results = answer_token_logprobs(model, collator, [example for _, example in chunk])
        for (q_index, example), (logprobs, _) in zip(chunk, results):
            scores[q_index].append(float(logprobs[: option_tokens(example.answer)].sum()))
    return scores


def choice_accuracy(model, processor, questions: Sequence[tuple[ChatExample, Sequence[str], int]], *,
                    batch_size: int = 16, progress: str | None = None) -> float:
    """Accuracy in percent on (question, options, index of the right option): the likeliest option wins.

    Args:
        model: the model to score.
        processor: its tokenizer or multimodal processor.
        questions: (question, options, index of the right option) triples.
        batch_size: candidate answers per forward pass.
        progress: a progress bar's label, or None for no bar.
    """
    scores = option_scores(model, processor, [(q, options) for q, options, _ in questions], batch_size=batch_size,
                           progress=progress)
    correct = sum(max(range(len(s)), key=s.__getitem__) == right for s, (_, _, right) in zip(scores, questions))
    return 100.0 * correct / len(questions)


def routing_on_prompt_only(model, input_ids: torch.Tensor, labels: torch.Tensor):
    """A context in which a routed library that routes by the whole prompt (prototype_pooling="prompt") chooses on
    the prompt alone, as generate() would, though the teacher-forced input holds the answer too.

    Args:
        model: the model about to score ``input_ids`` (anything but a routed library: nothing changes).
        input_ids: [B, S], left-padded, the answers ending in the last column (ChatCollator).
        labels: the answer-only labels ChatCollator gives with it (possibly only the last columns).
    """
    tuner = getattr(model, "base_model", None)
    if not hasattr(tuner, "prompt_positions"):
        return contextlib.nullcontext()
    answer_lengths = (labels != IGNORE_INDEX).sum(dim=1, keepdim=True)  # answers end in the last column
    width = input_ids.shape[1]
    return tuner.prompt_positions(torch.arange(width).unsqueeze(0) < width - answer_lengths)


def _collator(model, processor) -> ChatCollator:
    return ChatCollator(processor, answer_logits_only=accepts_logits_to_keep(model))


def chunks(items: Sequence[Any], size: int, progress: str | None) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``items``, with a tqdm bar labelled ``progress`` (none when it is None).

    Args:
        items: what to cut into batches.
        size: the batch size.
        progress: the progress bar's label, or None for no bar.
    """
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        yield items[start:start + size]

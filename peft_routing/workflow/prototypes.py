"""Computing an expert's task prototype from the task's own examples (REPRO's, at the block the router pools).

The prototype is the normalised mean of the prompts' features at each prompt's last position, taken from the
hidden states entering the prototype block on the base model (adapters off): their causal mean (``"causal_mean"``)
or the normalised state at that position alone (``"last"``; ``ops.prototypes.FEATURES``). The floor is the lowest
cosine to the prototype at any position that predicts an answer token of these examples: a prefix farther than that
from every prototype looks like no task the library learnt (prefix pooling). The prompt floor does the same for
whole prompts (prompt pooling): the farthest training prompt's distance, with slack (``ops.prototypes.prompt_floor``),
since a floor at the farthest of n prompts would send 1 in n + 1 of the task's own new prompts to the base model.
"""

from __future__ import annotations

import warnings

import torch

from ..ops.prototypes import FEATURES, prompt_floor, prototype_of, similarities
from ..tuner.prototype import POOLINGS, Prototype
from ..tuner.prototype_router import decoder_blocks
from .collate import IGNORE_INDEX, ChatCollator
from .data import ChatExample, as_examples
from .evaluation import chunks

MAX_PROTOTYPE_EXAMPLES = 128  # REPRO's sample count per task
# The prompt feature compute_prototype takes above block 0: the prompt's last position weighs the question over the
# image tokens, which tell related image tasks apart (benchmarks/RESULTS.md, "The prompt's last position").
DEFAULT_FEATURE = "last"
FEW_EXAMPLES = 16  # below this the floors come from too few prompts to say where a task's new prompts fall


@torch.no_grad()
def compute_prototype(model, expert: str, data, processor, *, max_examples: int = MAX_PROTOTYPE_EXAMPLES,
                      layer: int | None = None, pooling: str | None = None, batch_size: int = 16) -> Prototype:
    """Compute ``expert``'s prototype from at most ``max_examples`` of its task's examples and give it to the expert.

    Nothing of the data is kept; ``model.save_expert`` writes the prototype into the expert folder.

    Args:
        model: a routed-LoRA PeftModel holding ``expert``.
        expert: the expert whose task the examples are.
        data: the task's examples with answers (a JSONL path, a list of records or of ``ChatExample``).
        processor: the model's tokenizer or multimodal processor.
        max_examples: use at most this many examples (the first ones).
        layer: the decoder block whose input is pooled (default: the lowest block any expert adapts).
        pooling: the prompt feature, ``"last"`` (the prompt's last position, which has read the whole prompt;
            weighted towards the question) or ``"causal_mean"`` (every prompt position alike, image tokens
            included). Default: ``DEFAULT_FEATURE`` above block 0; at block 0, whose input is the token embeddings,
            ``"causal_mean"``. Every expert of a library routed by prototypes needs the same layer and pooling.
        batch_size: examples per forward pass.
    """
    tuner = model.base_model
    if expert not in tuner.experts:
        raise ValueError(f"No expert named {expert!r}; the experts are {tuner.experts}.")
    examples = as_examples(data)[:max_examples]
    if not examples:
        raise ValueError(f"compute_prototype needs at least one example of {expert!r}'s task.")
    layer = lowest_adapted_block(tuner) if layer is None else layer
    pooling = pooling or (DEFAULT_FEATURE if layer > 0 else "causal_mean")
    check_pooling(pooling, layer)
    prompt_features, answer_features = prototype_features(model, processor, examples, layer, batch_size, pooling)
    vector = prototype_of(prompt_features)
    floor = float(similarities(answer_features, vector.unsqueeze(0)).min().clamp(-1.0, 1.0))
    prompts_floor = prompt_floor(similarities(prompt_features, vector.unsqueeze(0)).squeeze(1))
    prototype = Prototype(vector, layer, floor, len(examples), pooling, prompt_floor=prompts_floor)
    if len(examples) < FEW_EXAMPLES:
        warnings.warn(f"compute_prototype({expert!r}) had only {len(examples)} examples: its floors are unreliable, "
                      "and with fallback='base' the task's own new prompts may run on the base model (with one "
                      f"example, all but near-copies of it). Give it {FEW_EXAMPLES} or more (REPRO uses 128).",
                      stacklevel=3)  # past torch.no_grad's wrapper, to the caller
    tuner.set_prototype(expert, prototype)
    return prototype


def check_pooling(pooling: str, layer: int) -> None:
    """Refuse an unknown pooling, and ``"last"`` at block 0, whose input at a position is that token's embedding
    alone: every prompt ending in the chat template's assistant header would get the same feature."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if pooling == "last" and layer == 0:
        raise ValueError("pooling='last' needs a block above the first (block 0's input is the token embedding, "
                         "the same for every prompt's last token); give layer >= 1 or pooling='causal_mean'.")


def lowest_adapted_block(tuner) -> int:
    """The lowest decoder block any expert of the library adapts: the prototype block that costs nothing.

    Args:
        tuner: the model's ``RoutingLoraModel``.
    """
    paths = [path for path, layer in tuner.model.named_modules() if hasattr(layer, "lora_route")]
    found = decoder_blocks(tuner.model, paths)
    if found is None or not found[2]:
        raise ValueError("Found no decoder blocks holding the routed layers; pass layer=... explicitly.")
    return min(found[2].values())


@torch.no_grad()
def prototype_features(model, processor, examples: list[ChatExample], layer: int, batch_size: int,
                       pooling: str = "causal_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt features [n, d] (at each prompt's last position) and features at every answer-predicting position."""
    collator = ChatCollator(processor)
    prompts, answers = [], []
    with model.disable_adapter():
        for chunk in chunks(examples, batch_size, None):
            batch = collator(list(chunk))
            labels = batch.pop("labels")
            hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
            pooled, _ = FEATURES[pooling](hidden, batch["attention_mask"])
            predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
            predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
            first = predicts_answer.int().argmax(dim=1)  # left padding: the prompt's last position
            prompts.append(pooled[torch.arange(len(chunk)), first])
            answers.append(pooled[predicts_answer])
    return torch.cat(prompts), torch.cat(answers)


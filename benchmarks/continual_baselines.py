"""The comparison methods of the continual-learning benchmark that are not our routing (benchmark-protocol.md).

* merges: PEFT's ``add_weighted_adapter`` over the task experts. "linear" is task arithmetic on the full updates
  (``combination_type="cat"``: the merged LoRA's B A is exactly sum_i w_i s_i B_i A_i); "ties" is TIES on the full
  updates, brought back to rank r by SVD (``"ties_svd"``, density 0.5). PEFT's own "linear"/"ties" average A and B
  separately, which is not task arithmetic of the updates.
* MR-LoRA style: a router LoRA, trained on 20 replayed examples per task, answers which task an example is; a second
  pass runs that task's expert. The id is read by scoring each task name as the answer (constrained decoding).
* REPRO: training-free. A task's prototype is the mean, over 128 of its training examples, of the base model's
  last hidden state mean-pooled over the prompt; an example goes to the expert of the nearest prototype (cosine).
"""

from __future__ import annotations

from typing import Sequence

import torch

from peft_routing.collate import ChatCollator
from peft_routing.data import ChatExample
from peft_routing.evaluation import answer_accuracy, answer_token_logprobs, choice_accuracy

MERGES = {"merge_linear": dict(combination_type="cat"), "merge_ties": dict(combination_type="ties_svd", density=0.5)}


def add_merged_expert(model, experts: Sequence[str], method: str, weight: float = 1.0) -> str:
    """Merge ``experts`` into a new adapter named ``method`` and put the model in its expert phase."""
    model.add_weighted_adapter(list(experts), [weight] * len(experts), method, **MERGES[method])
    model.set_phase("expert", method)
    return method


def router_examples(tasks, per_task: int = 20) -> list[ChatExample]:
    """MR-LoRA's replay set: ``per_task`` training prompts of each task, answered with the task's name."""
    examples = []
    for task in tasks:
        for example in task.train[:per_task]:
            examples.append(ChatExample(example.prompt_messages + [{"role": "assistant", "content": task.name}],
                                        example.images))
    return examples


def mr_lora_choices(model, tokenizer, router: str, names: Sequence[str], examples: Sequence[ChatExample]) -> list[str]:
    """First pass: the router adapter picks, for each example, the task name it finds most likely."""
    model.set_phase("expert", router)
    picks = []
    for example in examples:
        scores = _option_scores(model, tokenizer, example, names)
        picks.append(names[max(range(len(names)), key=scores.__getitem__)])
    return picks


def _option_scores(model, tokenizer, question: ChatExample, options: Sequence[str]) -> list[float]:
    collator = ChatCollator(tokenizer, answer_logits_only=True)
    candidates = [ChatExample(question.prompt_messages + [{"role": "assistant", "content": o}], question.images)
                  for o in options]
    lengths = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    results = answer_token_logprobs(model, collator, candidates)
    return [float(lp[:n].sum()) for (lp, _), n in zip(results, lengths)]


@torch.no_grad()
def prompt_features(model, tokenizer, examples: Sequence[ChatExample], batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last hidden state of the prompt (no answer), base model only: [len(examples), d]."""
    collator = ChatCollator(tokenizer)
    rows = []
    with model.disable_adapter():
        for start in range(0, len(examples), batch_size):
            batch = collator.prompts(list(examples[start:start + batch_size]))
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows)


def repro_prototypes(model, tokenizer, tasks, per_task: int = 128) -> torch.Tensor:
    """One prototype per task: the normalised mean feature of ``per_task`` training examples."""
    prototypes = [prompt_features(model, tokenizer, task.train[:per_task]).mean(0) for task in tasks]
    return torch.nn.functional.normalize(torch.stack(prototypes), dim=-1)


def repro_choices(model, tokenizer, prototypes: torch.Tensor, names: Sequence[str], examples) -> list[str]:
    features = torch.nn.functional.normalize(prompt_features(model, tokenizer, examples), dim=-1)
    return [names[i] for i in (features @ prototypes.t()).argmax(-1).tolist()]


def accuracy_with_choices(model, tokenizer, examples: Sequence[ChatExample], choices: Sequence[str]) -> float:
    """Second pass: each example answered by the expert chosen for it; overall exact-match accuracy in %."""
    correct = 0.0
    for expert in sorted(set(choices)):
        group = [e for e, c in zip(examples, choices) if c == expert]
        model.set_phase("expert", expert)
        correct += answer_accuracy(model, tokenizer, group) * len(group) / 100
    return 100.0 * correct / len(examples)


def general_with_choices(model, tokenizer, probe, choices: Sequence[str]) -> float:
    """The general probe answered question by question with the expert chosen for each."""
    correct = 0.0
    for expert in sorted(set(choices)):
        group = [q for q, c in zip(probe, choices) if c == expert]
        model.set_phase("expert", expert)
        correct += choice_accuracy(model, tokenizer, group) * len(group) / 100
    return 100.0 * correct / len(probe)

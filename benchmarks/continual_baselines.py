"""The comparison methods of the continual-learning benchmark that are not our routing.

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

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from peft_routing.workflow import (
    ChatCollator,
    ChatExample,
    answer_accuracy,
    answer_nll,
    choice_accuracy,
    option_scores,
)

MERGES = {"merge_linear": dict(combination_type="cat"), "merge_ties": dict(combination_type="ties_svd", density=0.5)}


def add_merged_expert(model, experts: Sequence[str], method: str, weight: float = 1.0) -> str:
    """Merge ``experts`` into a new adapter named ``method`` and put the model in its expert phase (PEFT's merge is
    refused in the route phase, where the merged adapter would be routed like a trained expert)."""
    model.set_phase("expert", experts[0])
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
    scores = option_scores(model, tokenizer, [(example, names) for example in examples])
    return [names[max(range(len(names)), key=row.__getitem__)] for row in scores]


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
    return _scored_by_chosen_expert(model, examples, choices, lambda group: answer_accuracy(model, tokenizer, group))


def general_with_choices(model, tokenizer, probe, choices: Sequence[str]) -> float:
    """The general probe answered question by question with the expert chosen for each."""
    return _scored_by_chosen_expert(model, probe, choices, lambda group: choice_accuracy(model, tokenizer, group))


def general_texts(n: int) -> list[ChatExample]:
    """Real English text no task draws on: MMLU questions answered with worked explanations (the chain-of-thought
    exemplars that ship with lm-eval, read as files: ``pip install --no-deps lm-eval==0.4.13``), in subject order."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("The NLL probe reads lm-eval's MMLU exemplars: pip install --no-deps lm-eval==0.4.13")
    folder = Path(spec.origin).parent / "tasks" / "mmlu" / "flan_cot_fewshot"
    examples = []
    for path in sorted(folder.glob("mmlu_*.yaml")):
        for sample in (yaml.safe_load(path.read_text()).get("fewshot_config") or {}).get("samples", []):
            examples.append(ChatExample([{"role": "user", "content": str(sample["question"]).strip()},
                                         {"role": "assistant", "content": str(sample["target"]).strip()}]))
    return examples[:n]


def nll_with_choices(model, tokenizer, examples: Sequence[ChatExample], choices: Sequence[str]) -> float:
    """The NLL probe with each text scored by the expert chosen for it (weighted by its answer tokens)."""
    total, count = 0.0, 0
    collator = ChatCollator(tokenizer)
    for expert in sorted(set(choices)):
        group = [example for example, choice in zip(examples, choices) if choice == expert]
        model.set_phase("expert", expert)
        tokens = sum(collator.render(example).answer_tokens for example in group)
        total, count = total + answer_nll(model, tokenizer, group) * tokens, count + tokens
    return total / count


def _scored_by_chosen_expert(model, items: Sequence, choices: Sequence[str], accuracy) -> float:
    """Overall accuracy in % when each group of items sharing a chosen expert is scored with that expert."""
    correct = 0.0
    for expert in sorted(set(choices)):
        group = [item for item, choice in zip(items, choices) if choice == expert]
        model.set_phase("expert", expert)
        correct += accuracy(group) * len(group) / 100
    return 100.0 * correct / len(items)
